"""Exit gates (issue 7): they learn when a head agrees, round-trip, and run the head only on exit."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_backbone

from exporter import api
from exporter.calibrate import calibrate_thresholds
from exporter.checkpoint import load_gates, load_heads, read_config, read_scores
from runtime.manifest import from_json_thresholds, to_json_thresholds
from exporter.data import make_splits
from exporter.gates import ExitGates, train_gates
from exporter.heads import ExitHeads
from exporter.recipes import ModelSource, Recipe, TrainConfig
from exporter.train import cache_features, check_cost, exit_scores, train_heads
from runtime import Runtime

EXITS = [1, 2, 3]
CFG = TrainConfig(head="adapter", rank=8, seq_len=32, train_tokens=3000, calib_tokens=1500, heldout_tokens=800,
                  steps=60, batch_tokens=256, lr=1e-2, seed=0, gates=True, gate_width=16, gate_steps=300,
                  gate_features=["hidden", "move", "shortlist", "position"], gate_shortlist=16, device="cpu")


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random agreeing token scores above a random disagreeing one (ties count 1/2)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_gate_separates_agreeing_tokens_on_heldout():
    bb = tiny_backbone("llama")
    splits = make_splits([SAMPLE_TEXT], bb.tokenizer, 32, {"train": 3000, "calib": 10, "heldout": 1500})
    heads = ExitHeads("adapter", EXITS, bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=8)
    train = cache_features(bb, splits["train"], EXITS)
    train_heads(bb, heads, train, CFG)
    gates = ExitGates(len(EXITS), bb.shape.hidden_size, width=16)
    losses = train_gates(gates, bb, heads, train, exit_scores(bb, heads, train).agree, steps=300)
    assert losses[-1] < losses[0]
    held = exit_scores(bb, heads, cache_features(bb, splits["heldout"], EXITS), "gate", gates)
    aucs = []
    for k in range(len(EXITS)):
        agree = held.agree[:, k]
        if 0.05 < agree.mean() < 0.95:  # both classes present in numbers: AUC is meaningful
            aucs.append(auc(held.confidence[:, k], agree))
    assert aucs, "the tiny model's heads should neither always nor never agree"
    print('gate AUC per exit', aucs)
    assert min(aucs) > 0.6, aucs  # chance is 0.5
    # the check is cheap next to the head it replaces (on this toy model the head is tiny too)
    assert check_cost(bb, heads, "gate", gates) < check_cost(bb, heads, "top1")


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A trained checkpoint with gates (saved model folder so export can reload it)."""
    d = tmp_path_factory.mktemp("gated")
    bb = tiny_backbone("llama")
    model_dir = d / "model"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    text = d / "t.txt"
    text.write_text(SAMPLE_TEXT)
    recipe = Recipe(name="tiny", source=ModelSource(str(model_dir)), exits=EXITS, confidence="gate", train=CFG)
    ckpt = api.train(recipe, out=d / "ck", data=[text], backbone=bb, target=0.9)
    return d, ckpt, bb


def test_gate_scores_and_thresholds_roundtrip(gated):
    d, ckpt, bb = gated
    # a recipe with confidence "gate" calibrates the gates' scores right after training
    trained = read_config(ckpt)
    assert trained.confidence == "gate" and trained.head_confidence == "top1"
    assert trained.thresholds == to_json_thresholds(calibrate_thresholds(read_scores(ckpt, "calibration", "gate"), 0.9))
    reports = api.calibrate(ckpt, target=0.8, confidence="gate")
    cfg = read_config(ckpt)
    assert cfg.confidence == "gate" and cfg.head_confidence == "top1" and cfg.gate_width == 16
    assert reports["heldout"].agreement >= 0.8 - 0.05  # held-out text: the target up to sampling noise
    stored = read_scores(ckpt, "calibration", "gate")
    assert stored.check_cost < read_scores(ckpt, "calibration").check_cost
    # the saved gates and heads reproduce the scores the *trained* ones computed during `train`
    splits = make_splits([SAMPLE_TEXT], bb.tokenizer, CFG.seq_len, {"train": CFG.train_tokens,
                         "calib": CFG.calib_tokens, "heldout": CFG.heldout_tokens}, seed=CFG.seed)
    feats = cache_features(bb, splits["calib"], EXITS)
    heads, gates = load_heads(ckpt, bb), load_gates(ckpt, bb)
    np.testing.assert_allclose(exit_scores(bb, heads, feats, "gate", gates).confidence, stored.confidence,
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(exit_scores(bb, heads, feats).confidence,
                               read_scores(ckpt, "calibration").confidence, rtol=0, atol=1e-6)
    assert stored.confidence.std() > 1e-3  # trained gates, not a constant
    # ... and the thresholds reach the manifest unchanged, with the head as a separate graph
    out = api.export(ckpt, out=d / "onnx_gate", backbone=bb)
    manifest = json.loads((out / "manifest.json").read_text())
    rt = Runtime.load(out)
    assert rt.manifest.segments[0].exit.confidence == "gate"
    got = from_json_thresholds(rt.manifest.calibration.thresholds)  # the one copy (exits hold none)
    want = [float("inf") if t is None else t for t in cfg.thresholds]
    assert np.allclose(got, want)
    assert len(rt.manifest.heads) == 1 and "heads" in manifest  # adapter heads share one head graph
    # the segment graph itself outputs no token and no logits: only the gate score and the head input
    names = [t.role for t in rt.manifest.segments[0].outputs]
    assert "token" not in names and "confidence" in names and "exit_hidden" in names


def test_gated_runtime_matches_in_graph_heads(gated):
    d, ckpt, bb = gated
    api.calibrate(ckpt, target=0.8, confidence="gate")
    rt_gate = Runtime.load(api.export(ckpt, out=d / "g", backbone=bb))
    api.calibrate(ckpt, target=0.8, confidence="top1")
    rt_head = Runtime.load(api.export(ckpt, out=d / "h", backbone=bb))
    prompt = "It is a truth"
    for k in range(len(EXITS)):
        forced = [float("inf")] * len(EXITS)
        forced[k] = 0.0  # everyone leaves at exit k
        a = rt_gate.generate(prompt, 12, thresholds=forced)
        b = rt_head.generate(prompt, 12, thresholds=forced)
        assert a.tokens == b.tokens
        assert {r.segment for r in a.records[1:]} == {k}
    # exits disabled: both are the full model
    assert rt_gate.generate(prompt, 12, thresholds="never").tokens == rt_head.generate(prompt, 12, thresholds="never").tokens


def test_gated_defer_cache_is_exact(gated):
    d, ckpt, bb = gated
    api.calibrate(ckpt, target=0.8, confidence="gate")
    rt = Runtime.load(api.export(ckpt, out=d / "g2", backbone=bb))
    prompt = "It is a truth universally"
    calibrated = rt.generate(prompt, 24)  # the calibrated gates decide
    exits = [r.segment for r in calibrated.records]
    assert min(exits) < len(EXITS) and max(exits) == len(EXITS), exits  # early exits, and deep tokens after them
    ids = list(rt.encode(prompt)) + list(calibrated.tokens)
    full = rt.new_cache()
    rt.step(np.array(ids), full, rt.resolve_thresholds("never"))
    # replay through the calibrated run's cache, then one full token to catch up: same cache as one full pass
    cache = rt.new_cache()
    th = rt.resolve_thresholds(None)
    x = np.array(ids[:len(rt.encode(prompt))])
    for tok in calibrated.tokens:
        rt.step(x, cache, th)
        x = np.array([tok])
    rt.step(x, cache, rt.resolve_thresholds("never"))
    for st, ref in zip(cache.segments, full.segments):
        assert st.length == ref.length == len(ids)
        for a, b in zip(st.keys + st.values, ref.keys + ref.values):
            assert np.abs(a[:, :, :st.length] - b[:, :, :ref.length]).max() < 1e-4


def test_gate_confidence_needs_gates(tmp_path):
    bb = tiny_backbone("gpt2")
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    recipe = Recipe(name="tiny", source=ModelSource("tiny"), exits=[2],
                    train=TrainConfig(**{**CFG.__dict__, "gates": False, "steps": 5}))
    ckpt = api.train(recipe, out=tmp_path / "ck", data=[text], backbone=bb, target=0.9)
    with pytest.raises(FileNotFoundError, match="gates"):
        api.calibrate(ckpt, target=0.9, confidence="gate")
    with pytest.raises(ValueError, match="stored head scores use confidence"):
        api.calibrate(ckpt, target=0.9, confidence="margin")


def test_gate_features_match_between_training_and_exported_graph(gated):
    """Every gate feature (hidden, move, shortlist, position) as the exported segment computes it
    equals the training-side computation from cached states: scores within 1e-4 (fp32)."""
    from exporter.cache import cache_features
    from exporter.checkpoint import load_heads

    d, ckpt, bb = gated
    api.calibrate(ckpt, target=0.8, confidence="gate")
    rt = Runtime.load(api.export(ckpt, out=d / "parity", backbone=bb))
    cfg = read_config(ckpt)
    heads, gates = load_heads(ckpt, bb, cfg), load_gates(ckpt, bb, cfg)
    assert gates.features == ("hidden", "move", "shortlist", "position")
    ids = np.asarray(rt.encode(SAMPLE_TEXT[:24]))
    windows = make_splits([SAMPLE_TEXT], bb.tokenizer, 24, {"train": 24, "calib": 24, "heldout": 24})["train"]
    windows.ids = ids[None, :]
    feats = cache_features(bb, windows, EXITS, topk=4)
    train_side = gates.score_features(bb, heads, feats)  # (24 positions, exits)
    graph_side = np.zeros_like(train_side)
    for p in range(len(ids)):  # prefill ids[:p+1]: each segment scores its last position, p
        cache, x = rt.new_cache(), ids[None, :p + 1]
        for j, (seg, backend) in enumerate(zip(rt.manifest.segments[:-1], rt.backends)):
            out = backend.run(rt._feeds(seg, x, cache, j, p + 1))
            graph_side[p, j] = out["confidence"][0]
            x = out["hidden_out"]
    np.testing.assert_allclose(graph_side, train_side, rtol=0, atol=1e-4)
    assert train_side.std() > 1e-3  # the scores vary: the comparison is not between constants
