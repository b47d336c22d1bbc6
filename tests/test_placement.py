"""Exits placed by data (issue 12): checks that never fire are dropped, the rest recalibrated."""

import numpy as np
import torch
from conftest import SAMPLE_TEXT, tiny_backbone

from exporter import api
from exporter.checkpoint import load_gates, load_heads, read_config, read_scores
from exporter.placement import prune_exits, take_exits
from exporter.recipes import ModelSource, Recipe, TrainConfig
from exporter.scores import ExitScores


def test_prune_drops_an_exit_that_never_fires():
    rng = np.random.default_rng(0)
    n = 4000
    conf = rng.random((n, 3))
    agree = rng.random((n, 3)) < conf  # confident tokens agree: exits 0 and 2 can fire
    agree[:, 1] = False  # exit 1's head never agrees: no threshold reaches the target
    s = ExitScores(conf, agree, np.arange(n) // 20, [2, 4, 6], 8)
    assert prune_exits(s, 0.9, 0.0) == [0, 1, 2]  # min_share 0 keeps everything
    keep = prune_exits(s, 0.9, 0.01)
    assert keep == [0, 2]
    sub = take_exits(s, keep)
    assert sub.exit_layers == [2, 6] and np.array_equal(sub.confidence, conf[:, [0, 2]])


def test_train_with_auto_exits_keeps_a_consistent_checkpoint(tmp_path):
    bb = tiny_backbone("llama", layers=6)
    model_dir = tmp_path / "m"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    cfg = TrainConfig(rank=4, seq_len=32, train_tokens=2000, calib_tokens=1200, heldout_tokens=600, steps=20,
                      batch_tokens=256, lr=1e-2, gate_width=8, gate_steps=30, gate_features=["hidden", "move"],
                      device="cpu")
    recipe = Recipe(name="tiny", source=ModelSource(str(model_dir)), confidence="gate", exit_min_share=0.3, train=cfg)
    ck = api.train(recipe, out=tmp_path / "ck", data=[tmp_path / "t.txt"], backbone=bb, exits="auto", target=0.9)
    c = read_config(ck)
    assert c.train["candidate_exits"] == [2, 4] and c.train["exit_min_share"] == 0.3
    assert set(c.exits) <= {2, 4} and len(c.exits) == len(c.thresholds) >= 1
    for split in ("calibration", "heldout"):
        assert read_scores(ck, split, "gate").exit_layers == c.exits
    heads, gates = load_heads(ck, bb, c), load_gates(ck, bb, c)  # the pruned weights load back
    assert len(heads.heads) == len(gates.gates) == len(c.exits)
    assert gates.score(0, torch.randn(2, bb.shape.hidden_size), torch.randn(2, bb.shape.hidden_size)).shape == (2,)


def test_calibrate_prunes_a_trained_checkpoint_that_still_exports(tmp_path):
    """`lama calibrate --exit-min-share`: the exits that would not fire are dropped from the
    heads, gates and every score file, the rest recalibrated, and the export has their segments.
    What the rewrite does not own (reports/ the benchmarks write into a checkpoint) stays."""
    from conftest import make_checkpoint

    from runtime import Runtime

    ck, bb = make_checkpoint(tmp_path, "llama", exits=(1, 2, 3), gates=True)
    (ck / "reports").mkdir()
    (ck / "reports" / "domains.md").write_text("a report")
    (ck / "notes.txt").write_text("notes")
    before = read_scores(ck, "calibration", "gate")
    expect = prune_exits(before, 0.6, 0.05)
    assert len(expect) < 3  # random heads: some exit sends out less than 5% at 0.6
    api.calibrate(ck, target=0.6, exit_min_share=0.05, margin=0.0, backbone=bb)
    c = read_config(ck)
    assert c.exits == [before.exit_layers[i] for i in expect] and len(c.thresholds) == len(c.exits)
    assert c.train["pruned_exits"] == sorted(set(before.exit_layers) - set(c.exits))
    assert (ck / "reports" / "domains.md").read_text() == "a report" and (ck / "notes.txt").read_text() == "notes"
    for split in ("calibration", "heldout"):
        for kind in ("head", "gate"):
            s = read_scores(ck, split, kind)
            assert s.exit_layers == c.exits
    after = read_scores(ck, "calibration", "gate")
    assert np.array_equal(after.agree, before.agree[:, expect])  # the same tokens, the same heads
    # the stored gate scores are the pruned chain's own (a gate's 'move' reads the previous *kept*
    # exit), as the runtime and the benchmark compute them from the pruned heads and gates
    from conftest import checkpoint_scores

    from exporter.checkpoint import scores_file

    again = checkpoint_scores(bb, load_heads(ck, bb), load_gates(ck, bb))[scores_file("calibration", "gate")]
    assert np.allclose(again.confidence, after.confidence, atol=1e-5)
    out = api.export(ck, out=tmp_path / "onnx", backbone=bb)
    rt = Runtime.load(out)
    assert [e.exit_layer for e in rt.manifest.exits] == c.exits
    assert len(rt.manifest.segments) == len(c.exits) + 1
    assert len(rt.generate("Once upon a time", 4).tokens) == 4


def test_pruning_retrains_gates_when_the_training_windows_are_known(tmp_path):
    """With training windows recorded (as `lama train` records them), pruning trains the gates
    again for the kept exits: their 'move' feature now starts at another exit."""
    from conftest import make_checkpoint

    from exporter.api import _rewrite_config

    ck, bb = make_checkpoint(tmp_path, "llama", exits=(1, 2, 3), gates=True)
    c = read_config(ck)
    c.train["config"].update(train_tokens=640, gate_tokens=320, gate_steps=5)
    from exporter.data import make_splits, window_hashes  # the windows such a record draws, as train records them

    tokens = {s: c.train["config"][f"{s}_tokens"] for s in ("train", "calib", "heldout")}
    c.train["windows_sha256"] = window_hashes(make_splits([SAMPLE_TEXT], bb.tokenizer, 32, tokens))
    _rewrite_config(ck, c)
    old = load_gates(ck, bb).state_dict()
    api.calibrate(ck, target=0.6, exit_min_share=0.05, margin=0.0, backbone=bb)
    c = read_config(ck)
    assert c.train["gates_retrained_after_pruning"] and len(c.exits) < 3
    new = load_gates(ck, bb)
    assert len(new.gates) == len(c.exits)
    kept = [[1, 2, 3].index(e) for e in c.exits]
    assert not torch.equal(new.gates[0][0].weight, old[f"gates.{kept[0]}.0.weight"])  # trained again
    assert read_scores(ck, "heldout", "gate").exit_layers == c.exits
