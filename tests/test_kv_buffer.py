"""KV layout "buffer": GroupQueryAttention on preallocated buffers updated in place."""

import json

import numpy as np
import pytest
from conftest import decode_against_pytorch, make_checkpoint

from exporter import api
from exporter.families import UnsupportedArchitecture
from runtime import BackendError, ManifestError, Runtime
from runtime.kv_buffer import ContextTooLong, KVBufferCache
from runtime.manifest import Manifest

CAPACITY = 48


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    """The same tiny Llama checkpoint exported with both KV layouts."""
    d = tmp_path_factory.mktemp("kvbuf")
    ckpt, bb = make_checkpoint(d, "llama_hd16")
    concat = api.export(ckpt, out=d / "concat", with_logits=True, kv="concat", backbone=bb)
    buffer = api.export(ckpt, out=d / "buffer", with_logits=True, kv="buffer", kv_capacity=CAPACITY, backbone=bb)
    return concat, buffer, bb, ckpt


def force_exit(rt, j):
    n = len(rt.manifest.exits)
    return [float("inf")] * j + [0.0] * (n - j)


def valid(cache, j):
    """Segment j's cached keys+values, cut to its valid length (a buffer holds `capacity` rows)."""
    st = cache.segments[j]
    return [a[:, :, :st.length] for a in st.keys + st.values]


def test_manifest_records_layout(llama_exports):
    concat, buffer, _, _ = llama_exports
    m = Manifest.load(buffer)
    assert (m.kv_cache.layout, m.kv_cache.capacity) == ("buffer", CAPACITY)
    for seg in m.segments:
        assert seg.input("seqlens_k").dtype == "int32" and seg.input("total_sequence_length").shape == ()
        assert seg.input("attention_mask") is None  # GroupQueryAttention is causal by itself
        past = seg.per_layer(seg.inputs, "past_key")
        present = seg.per_layer(seg.outputs, "present_key")
        assert len(past) == len(present) == seg.layers[1] - seg.layers[0]
        assert past[0].shape[2] == present[0].shape[2] == "capacity"
    assert Manifest.load(concat).kv_cache.layout == "concat"
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    # a schema-1 manifest (before kv_cache existed) reads as the concat layout
    old = json.loads((concat / "manifest.json").read_text())
    old.pop("kv_cache")
    old["schema_version"] = 1
    assert Manifest.from_dict(old).kv_cache.layout == "concat"
    bad = json.loads(m.to_json())
    bad["kv_cache"] = {"layout": "ring", "capacity": 8}
    with pytest.raises(ManifestError, match="unknown KV layout 'ring'"):
        Manifest.from_dict(bad)


def test_buffer_chain_matches_pytorch(llama_exports):
    """Exits off: prefill, then decode steps, every step's logits within 1e-4 of a full forward pass."""
    _, buffer, bb, _ = llama_exports
    rt = Runtime.load(buffer)
    worst, ids, cache = decode_against_pytorch(rt, bb, "It is a truth", 12)
    assert isinstance(cache, KVBufferCache) and cache.capacity == CAPACITY
    assert worst <= 1e-4
    assert all(st.length == len(ids) - 1 for st in cache.segments)


def test_buffer_defer_equals_concat(llama_exports):
    """Early exits with deferred positions: the same tokens and the same (exact) caches as the
    concat export, including steps where a segment catches up several positions at once."""
    concat, buffer, _, _ = llama_exports
    rc, rb = Runtime.load(concat), Runtime.load(buffer)
    segs = len(rc.manifest.segments)
    rng = np.random.default_rng(3)
    pattern = rng.integers(0, segs, size=30).tolist()
    pattern[10:16] = [0] * 6  # a run of first-exit tokens: later segments then catch up 6+ positions
    cc, cb = rc.new_cache(), rb.new_cache()
    x = np.array(rc.encode("However little").tolist())
    for j in pattern:
        tc, jc, _, _ = rc.step(x, cc, force_exit(rc, j))
        tb, jb, _, _ = rb.step(x, cb, force_exit(rb, j))
        assert (tc, jc) == (tb, jb) == (tc, j)
        for s in range(segs):
            assert cc.segments[s].length == cb.segments[s].length
            assert cc.segments[s].pending_end == cb.segments[s].pending_end
            for a, b in zip(valid(cc, s), valid(cb, s)):
                assert np.abs(a - b).max() < 1e-4
        x = np.array([tc])
    assert any(cb.segments[s].length < cb.position for s in range(segs))  # some positions still deferred


def test_truncate_is_a_rollback(llama_exports):
    _, buffer, _, _ = llama_exports
    rt = Runtime.load(buffer)
    th = rt.resolve_thresholds("never")
    tokens = list(range(10, 30))
    fresh = rt.new_cache()
    rt.step(np.array(tokens), fresh, th)
    cache = rt.new_cache()
    rt.step(np.array(tokens[:12] + [90, 91, 92]), cache, th)  # three positions we then reject
    cache.truncate(12)
    assert all(st.length == 12 for st in cache.segments) and cache.position == 12
    rt.step(np.array(tokens[12:]), cache, th)
    for s in range(len(cache.segments)):
        for a, b in zip(valid(cache, s), valid(fresh, s)):
            assert np.abs(a - b).max() < 1e-5


def test_buffer_needs_cpu_provider(llama_exports):
    _, buffer, _, _ = llama_exports
    for providers in ("tensorrt", ["CUDAExecutionProvider"]):
        with pytest.raises(BackendError, match="CPU provider only"):
            Runtime.load(buffer, providers=providers)


def test_context_past_capacity(llama_exports):
    _, buffer, _, _ = llama_exports
    rt = Runtime.load(buffer)
    assert rt.max_context == CAPACITY
    with pytest.raises(ValueError, match=f"KV buffer capacity is {CAPACITY}"):
        rt.generate(list(range(CAPACITY)), 4)
    # generation stops at the capacity instead of failing
    res = rt.generate(list(range(CAPACITY - 5)), 20, thresholds="never", stop_at_eos=False)
    assert len(res.tokens) == 5
    cache = rt.new_cache()
    rt.step(np.arange(CAPACITY - 2), cache, rt.resolve_thresholds("never"))
    with pytest.raises(ContextTooLong, match=f"reached {CAPACITY + 1} positions but the KV buffers hold {CAPACITY}"):
        rt.step(np.array([1, 2, 3]), cache, rt.resolve_thresholds("never"))


def test_buffer_refused_where_unsupported(tmp_path, llama_exports):
    _, _, bb, ckpt = llama_exports
    with pytest.raises(ValueError, match="TensorRT cannot build"):
        api.export(ckpt, out=tmp_path / "trt", kv="buffer", backend="tensorrt", backbone=bb)
    with pytest.raises(ValueError, match="--kv-capacity must be between 1 and the model's context"):
        api.export(ckpt, out=tmp_path / "big", kv="buffer", kv_capacity=10**6, backbone=bb)
    with pytest.raises(ValueError, match="only applies to --kv buffer"):
        api.export(ckpt, out=tmp_path / "c", kv="concat", kv_capacity=16, backbone=bb)
    g_ckpt, g_bb = make_checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="not implemented for the gpt2 family"):
        api.export(g_ckpt, out=tmp_path / "g", kv="buffer", backbone=g_bb)
    l_ckpt, l_bb = make_checkpoint(tmp_path / "llama8", "llama")  # head size 8
    with pytest.raises(UnsupportedArchitecture, match="multiple of 16"):
        api.export(l_ckpt, out=tmp_path / "l", kv="buffer", backbone=l_bb)
    assert not any((tmp_path / n).exists() for n in ("g", "trt", "l"))
    # no --kv: buffer where the family supports it, concat elsewhere
    assert Manifest.load(api.export(l_ckpt, out=tmp_path / "l", backbone=l_bb)).kv_cache.layout == "concat"
    assert Manifest.load(api.export(ckpt, out=tmp_path / "d", backbone=bb)).kv_cache.layout == "buffer"


def test_cli_kv_options(tmp_path, llama_exports, capsys):
    from lama import cli

    _, _, _, ckpt = llama_exports
    out = tmp_path / "cli"
    assert cli.main(["export", str(ckpt), "--out", str(out), "--kv", "buffer", "--backend", "tensorrt"]) == 2
    assert "TensorRT cannot build" in capsys.readouterr().err and not out.exists()
    assert cli.main(["export", str(ckpt), "--out", str(out), "--kv", "buffer", "--kv-capacity", "32"]) == 0
    assert Manifest.load(out).kv_cache.capacity == 32
    assert cli.main(["generate", str(out), "It is", "--max-new-tokens", "4", "--full"]) == 0


def test_kept_cache_reuse_and_inspect(llama_exports):
    """A second call that shares a prefix reuses the kept buffers (cut by a shorter length)
    and gives the same tokens as a fresh runtime; `lama inspect` names the layout."""
    from runtime.inspect_export import describe, render

    _, buffer, _, _ = llama_exports
    rt = Runtime.load(buffer)
    first = rt.generate("It is a truth", 6, thresholds="never", stop_at_eos=False)
    prompt = rt.encode("It is a trick").tolist()  # shares "It is a tr" with the kept sequence
    again = rt.generate(prompt, 6, thresholds="never", stop_at_eos=False, reuse_cache=True)
    fresh = Runtime.load(buffer).generate(prompt, 6, thresholds="never", stop_at_eos=False)
    assert len(first.tokens) == 6 and again.cached_tokens == len("It is a tr")
    assert again.tokens == fresh.tokens
    text = render(describe(buffer))
    assert f"buffers of {CAPACITY} positions" in text
    assert "as computed by calls of >= 2 positions" in text  # GroupQueryAttention: padded one-position calls
    assert not describe(buffer)["row_invariant"]


def test_buffer_graphs_fuse_residuals_and_pack_qkv(tmp_path, llama_exports):
    """The buffer layout writes each residual add + RMSNorm as one SkipSimplifiedLayerNormalization
    and, once q|k|v are one product (int4), hands it to GroupQueryAttention packed: the int4 buffer
    export then gives the int4 concat export's tokens and logits (same weights, other graphs)."""
    import onnx

    from exporter.fuse_matmuls import pack_qkv_into_attention

    _, buffer, bb, ckpt = llama_exports
    m = Manifest.load(buffer)
    for seg in m.segments:
        ops = [n.op_type for n in onnx.load(str(buffer / seg.file)).graph.node]
        n = seg.layers[1] - seg.layers[0]
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n - 1  # the first input norm has no add before it
    # accuracy level 0: the kernel multiplies float inputs (level 4 rounds them to int8 per block,
    # which turns last-bit float differences between two graph layouts into visible ones)
    opts = {"accuracy_level": 0}
    q_buf = api.export(ckpt, out=tmp_path / "b4", precision="int4", with_logits=True, kv="buffer",
                       kv_capacity=CAPACITY, backbone=bb, quant_options=opts)
    q_cat = api.export(ckpt, out=tmp_path / "c4", precision="int4", with_logits=True, kv="concat", backbone=bb,
                       quant_options=opts)
    for seg in Manifest.load(q_buf).segments:
        model = onnx.load(str(q_buf / seg.file))
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert gqa and all(list(n.input[1:3]) == ["", ""] for n in gqa)  # packed QKV
        assert pack_qkv_into_attention(model) == 0  # nothing left to pack
    rb, rc = Runtime.load(q_buf), Runtime.load(q_cat)
    cb, cc = rb.new_cache(), rc.new_cache()
    x = np.array(rb.encode("It is a truth").tolist())
    worst = 0.0
    for _ in range(10):
        tb, _, _, lb = rb.step(x, cb, rb.resolve_thresholds("never"), want_logits=True)
        tc, _, _, lc = rc.step(x, cc, rc.resolve_thresholds("never"), want_logits=True)
        worst = max(worst, float(np.abs(lb - lc).max()))
        assert tb == tc
        x = np.array([tb])
    assert worst <= 1e-4, worst
