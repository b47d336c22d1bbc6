"""int8/int4 exports: MatMulNBits graphs, their numerics in PyTorch, and thresholds from quantized scores."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLE_TEXT, make_checkpoint, tiny_backbone

from exporter import api
from exporter.checkpoint import Checkpoint, read_config, read_scores
from exporter.onnx_export import export_graph
from exporter.quant_calibrate import quantized_backbone
from exporter.quantize import Scheme, dequantized, quantize_graph
from exporter.recipes import ModelSource, Recipe, TrainConfig
from exporter.segments import Segment, io_specs
from runtime import Manifest, Runtime
from runtime.manifest import ManifestError

PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    """A tiny Llama (tied embeddings) checkpoint exported at int4 with logits."""
    d = tmp_path_factory.mktemp("int4")
    ckpt, bb = make_checkpoint(d, "llama")
    return ckpt, bb, api.export(ckpt, out=d / "int4", precision="int4", with_logits=True, backbone=bb)


def test_quantized_export_roundtrips_through_the_manifest(int4_export):
    ckpt, bb, folder = int4_export
    m = Manifest.load(folder)
    q = m.quantization
    assert m.precision == "int4" and q.bits == 4 and q.block_size == 32 and q.accuracy_level == 4
    assert set(q.graphs) == {s.file for s in m.segments}
    # every weight MatMul became MatMulNBits, the tied LM head's included; the embedding Gather stays float
    per_graph = {f: sum(n.op_type == "MatMulNBits" for n in onnx.load(str(folder / f)).graph.node) for f in q.graphs}
    assert sum(per_graph.values()) == q.quantized_matmuls
    layer = 4  # q|k|v, o, gate|up, down (products of one input are fused: exporter/fuse_matmuls.py)
    assert per_graph["segment_00.onnx"] == layer + 2 + 1  # + adapter down/up + the LM head of the exit
    assert per_graph[m.segments[-1].file] == layer + 1  # + the model's own LM head
    assert any(i.name for i in onnx.load(str(folder / "segment_00.onnx")).graph.initializer
               if len(i.dims) == 2 and i.dims[0] == bb.shape.vocab_size)  # the float embedding for Gather
    again = Manifest.from_dict(json.loads(m.to_json()))
    assert again == m
    # a manifest without the key (older exports) still reads, with no quantization record
    d = json.loads(m.to_json())
    del d["quantization"]
    assert Manifest.from_dict(d).quantization is None
    d["quantization"] = {"bits": 4}
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_dict(d)


def test_dequantized_weights_are_what_matmulnbits_multiplies_by(tmp_path):
    """At accuracy level 0 the kernel computes in float with exactly the dequantized weights."""
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.normal(size=(80, 24)).astype(np.float32)  # K=80: a partial last block
    x = rng.normal(size=(3, 80)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 80])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
                          [numpy_helper.from_array(w, "W")])
    for bits, sym in ((4, False), (4, True), (8, True)):
        path = tmp_path / f"m{bits}{sym}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        scheme = Scheme(bits, 32, sym, 0)
        assert quantize_graph(path, scheme)[:2] == (1, [])
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        deq = dequantized(w, scheme)
        assert np.abs(y - x @ deq).max() < 1e-4
        assert np.abs(deq - w).max() > (0.05 if bits == 4 else 0.001)  # it did quantize


@pytest.mark.parametrize("level", [0, 4])
def test_fake_quant_reproduces_the_int4_graph_logits(int4_export, tmp_path, level):
    ckpt, bb, folder = int4_export  # accuracy level 4, the default
    if level != 4:
        folder = api.export(ckpt, out=tmp_path / "q", precision="int4", with_logits=True, backbone=bb,
                            quant_options={"accuracy_level": level})
    rt = Runtime.load(folder)
    ids = rt.encode(PROMPT)
    _, _, _, logits = rt.step(ids, rt.new_cache(), rt.resolve_thresholds("never"), want_logits=True)
    qbb, _, _, n = quantized_backbone(bb, Checkpoint.open(ckpt), Scheme.for_precision("int4", accuracy_level=level))
    assert n == 7 * bb.shape.num_layers + 1 + 2 * 3  # every decoder Linear, the LM head, 3 adapters
    with torch.no_grad():
        fake = qbb.model(torch.from_numpy(ids)[None]).logits[0, -1].numpy()
        fp32 = bb.model(torch.from_numpy(ids)[None]).logits[0, -1].numpy()
    assert np.abs(fake - logits[0]).max() < (1e-4 if level == 0 else 2e-3), np.abs(fake - logits[0]).max()
    assert np.abs(fp32 - logits[0]).max() > 20 * np.abs(fake - logits[0]).max()  # quantization shows
    assert bb.model.lm_head.weight is bb.model.model.embed_tokens.weight  # the caller's model is untouched


def _whole_model_greedy(path, prompt: list[int], n: int, kv_heads: int, head_dim: int, layers: int) -> list[int]:
    """Greedy decoding with onnxruntime on one graph holding the whole model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    past = {f"past_{kv}.{i}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in range(layers) for kv in ("key", "value")}
    x, pos, out = np.array([prompt]), 0, []
    for _ in range(n):
        end = pos + x.shape[1]
        feeds = {"input_ids": x, "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": np.arange(pos, end)[None], **past}
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feeds.items()
                                                                              if k in names})))
        past = {k: res[k.replace("past_", "present_")] for k in past}
        tok = int(res["token"][0])
        out.append(tok)
        x, pos = np.array([[tok]]), end
    return out


def test_quantized_chain_equals_the_whole_quantized_graph(int4_export, tmp_path):
    """Exits off, the int4 segment chain decodes the same tokens as one int4 graph of the whole model."""
    ckpt, bb, folder = int4_export
    whole = Segment(bb, None, 0, (0, bb.shape.num_layers)).eval()
    inputs, outputs = io_specs(whole, "float32")
    path = tmp_path / "whole.onnx"
    export_graph(whole, inputs, outputs, path, "fp32", bb.shape.vocab_size)
    q = Manifest.load(folder).quantization
    made, _, _ = quantize_graph(path, Scheme(q.bits, q.block_size, q.symmetric, q.accuracy_level))
    assert made == 4 * bb.shape.num_layers + 1  # q|k|v, o, gate|up, down per layer; the LM head
    rt = Runtime.load(folder)
    prompt = rt.encode(PROMPT).tolist()
    chain = list(rt.generate(prompt, 24, thresholds="never", stop_at_eos=False).tokens)
    ref = _whole_model_greedy(path, prompt, 24, bb.shape.num_kv_heads, bb.shape.head_dim, bb.shape.num_layers)
    assert chain == ref


def test_quantized_thresholds_come_from_quantized_scores(tmp_path, monkeypatch):
    import exporter.quant_calibrate as qc

    monkeypatch.setattr(qc, "NEW_TOKENS", 8)  # the greedy comparison's length: enough to be measured
    bb = tiny_backbone("llama")
    model_dir = tmp_path / "model"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    cfg = TrainConfig(head="adapter", rank=8, seq_len=32, train_tokens=1000, calib_tokens=1500, heldout_tokens=600,
                      steps=10, batch_tokens=256, lr=1e-2, seed=0, gates=False)
    recipe = Recipe(name="tiny", source=ModelSource(str(model_dir)), exits=[1, 2, 3], train=cfg)
    ckpt = api.train(recipe, out=tmp_path / "ck", data=[text], backbone=bb, target=0.9)
    assert read_config(ckpt).train["data"] == [str(text.resolve())]  # the export redraws the same windows
    # lama train stores the fp32 model's held-out top-1: what a fresh fp32 pass gives, position by position
    from exporter.train import cache_features

    stored = read_scores(ckpt, "heldout").full_top1
    windows = Checkpoint.open(ckpt).splits(bb.tokenizer, [text])["heldout"]
    fresh = cache_features(bb, windows, [1], desc="fp32")
    np.testing.assert_array_equal(stored, fresh.teacher_top1(fresh.active))
    # a checkpoint whose stored top-1 does not fit (e.g. trained before it was stored): one fp32 pass
    np.testing.assert_array_equal(qc.fp32_heldout_top1(bb, Checkpoint.open(ckpt), windows, 1, stored.size + 1), stored)
    passes = []  # so the export compares against it without running the fp32 model again
    real = qc.cache_features
    monkeypatch.setattr(qc, "cache_features", lambda bb, w, ex, desc="": passes.append(desc) or real(bb, w, ex, desc=desc))
    folder = api.export(ckpt, out=tmp_path / "int4", precision="int4", backbone=bb)
    assert len(passes) == 2 and not any("fp32" in d for d in passes), passes  # the quantized calib + held-out
    m = Manifest.load(folder)
    rec = m.quantization.calibration
    fp32 = read_scores(ckpt, "calibration")
    quant = read_scores(folder / "scores", "calibration")
    assert quant.num_tokens == fp32.num_tokens  # same windows ...
    assert not np.allclose(quant.confidence, fp32.confidence, atol=1e-3)  # ... scored by another model
    from exporter.calibrate import calibrate_thresholds

    expect = [None if t == float("inf") else t for t in calibrate_thresholds(quant, 0.9)]
    assert list(m.calibration.thresholds) == expect == rec["thresholds"]
    assert rec["fp32_thresholds"] == read_config(ckpt).thresholds
    assert m.calibration.by_target["0.9"] == expect
    assert m.calibration.report["agreement"] >= 0.85  # held-out agreement with the *quantized* model
    assert 0.0 < rec["teacher_forced_agreement_vs_fp32"] <= 1.0 and 0.0 < rec["greedy_agreement_vs_fp32"] <= 1.0
    assert rec["greedy_new_tokens"] == 8
    assert rec["teacher_forced_tokens"] == read_scores(ckpt, "heldout").num_tokens


def test_bad_quantization_requests(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="TensorRT"):
        api.export(ckpt, out=tmp_path / "x", precision="int4", backend="tensorrt", backbone=bb)
    with pytest.raises(ValueError, match="block size"):
        api.export(ckpt, out=tmp_path / "x", precision="int4", backbone=bb, quant_options={"block_size": 24})
    with pytest.raises(ValueError, match="int8/int4"):
        api.export(ckpt, out=tmp_path / "x", precision="fp32", backbone=bb, quant_options={"block_size": 32})
    with pytest.raises(ValueError, match="unknown precision"):
        api.export(ckpt, out=tmp_path / "x", precision="int3", backbone=bb)


@pytest.mark.parametrize("level", [0, 4])
def test_gguf_blocks_are_kept_exactly(tmp_path, level):
    """Weights holding GGUF blocks become MatMulNBits that multiply by exactly those values:
    Q4_1 (d*q + m) and Q4_K (the same on levels that need not reach 0 and 15) as 4 bits plus a
    float block-sum product for the offsets; Q8_0 (d*q), Q5_0 (d*(q-16)) and Q6_K (one scale per
    16 inputs) as 8 bits. The PyTorch twin gives the same numbers at either accuracy level; a
    weight without such blocks is re-quantized."""
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    from exporter.gguf_blocks import detect, exact_twin, q4_1_blocks, q8_0_blocks

    rng = np.random.default_rng(1)
    k, n = 96, 40
    d = rng.uniform(0.01, 0.05, (n, k // 32, 1)).astype(np.float32)
    m = (-d * rng.uniform(4, 11, (n, k // 32, 1))).astype(np.float32)
    q4 = rng.integers(0, 16, (n, k // 32, 32))
    q4[..., 0], q4[..., 1] = 0, 15  # Q4_1 puts each block's min and max on levels 0 and 15
    w41 = (d * q4 + m).reshape(n, k).T.astype(np.float32)
    q8 = rng.integers(-127, 128, (n, k // 32, 32))
    q8[..., 0] = 127
    w80 = (d * q8).reshape(n, k).T.astype(np.float32)
    q4k = rng.integers(2, 13, (n, k // 32, 32))  # Q4_K: levels 2..12 only, so min/max are not 0/15
    q4k[..., 0], q4k[..., 1] = 2, 3  # two neighbouring levels: the smallest gap is one step
    w4k = (d * q4k + m).reshape(n, k).T.astype(np.float32)
    q50 = rng.integers(0, 32, (n, k // 32, 32)) - 16  # Q5_0: d * (q - 16)
    w50 = (d * q50).reshape(n, k).T.astype(np.float32)
    q6 = rng.integers(0, 64, (n, k // 16, 16)) - 32  # Q6_K: a scale per 16 inputs
    d16 = rng.uniform(0.001, 0.01, (n, k // 16, 1)).astype(np.float32)
    w6k = (d16 * q6).reshape(n, k).T.astype(np.float32)
    other = rng.normal(size=(k, n)).astype(np.float32)
    assert q4_1_blocks(w41) is not None and q8_0_blocks(w80) is not None
    assert q4_1_blocks(other) is None and q8_0_blocks(other) is None
    assert [detect(w)[0] for w in (w41, w80, w4k, w50, w6k)] == ["q4_1", "q8_0", "q4_k", "int8_32", "int8_16"]
    assert detect(other) is None
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    weights = (w41, w80, w4k, w50, w6k, other)
    names = ["a", "b", "d", "e", "f", "c"]
    # separate inputs: products of one input would be fused first (tested apart)
    g = helper.make_graph([helper.make_node("MatMul", [f"x{i}", f"W{i}"], [f"y{i}"], name=f"/mm{i}") for i in names],
                          "g", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [None, None, k]) for i in names],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, None, n]) for i in names],
                          [numpy_helper.from_array(w, f"W{i}") for i, w in zip(names, weights)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    made, left, exact = quantize_graph(path, Scheme(4, 32, True, level, exact_blocks=True))
    assert (made, left, exact) == (6, [], {"q4_1": 1, "q4_k": 1, "q8_0": 1, "int8_32": 1, "int8_16": 1})
    ops = [nd.op_type for nd in onnx.load(str(path)).graph.node]
    assert "AveragePool" in ops and "ReduceSum" not in ops  # rank 3 known: one pool, no 0/1 MatMul
    ya, yb, yd, ye, yf, yc = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {f"x{i}": x for i in names})
    for y, w in ((ya, w41), (yb, w80), (yd, w4k), (ye, w50), (yf, w6k)):
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
        assert exact_twin(lin, level) is not None
        twin = lin(torch.from_numpy(x)).detach().numpy()
        assert np.abs(y - twin).max() < 1e-4 * np.abs(y).max()
        if level == 0:
            assert np.abs(y - x @ w).max() < 1e-4 * np.abs(y).max()
    if level == 4:
        # int8 activations cost about what they cost llama.cpp (the exact weights times the rounded
        # input), not more: the 4-bit part is centred, d*(q-8), so the rounding error is weighted by
        # about the weights; with d*q (all >= 0) it was 1.85x llama.cpp's error in this set-up
        from exporter.int8_activations import int8_blocks

        rounded = int8_blocks(32)(torch.from_numpy(x)).numpy() @ w41
        assert np.abs(ya - x @ w41).mean() < 1.5 * np.abs(rounded - x @ w41).mean()
    assert np.abs(yc - x @ other).max() > 1e-3  # the plain weight went through 4-bit rounding


def test_gguf_embedding_tables_are_gathered_from_their_blocks(tmp_path):
    """An embedding table holding 8-bit GGUF blocks (here Q6_K-like, a scale per 16) is gathered by
    GatherBlockQuantized from those bytes: the same rows, bit for bit, at a quarter of the size;
    a float table, or one too small to be a vocabulary, stays a Gather."""
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    v, dim = 1024, 96
    q6 = rng.integers(0, 64, (v, dim // 16, 16)) - 32
    table = (rng.uniform(0.001, 0.01, (v, dim // 16, 1)).astype(np.float32) * q6).reshape(v, dim).astype(np.float32)
    other = rng.normal(size=(v, dim)).astype(np.float32)
    small = table[:64].copy()
    names = ("table", "other", "small")
    # tracing leaves the table a Constant node (Gemma 3, SmolLM2), the others are initializers here
    const = helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(table, "table"))
    g = helper.make_graph([const] + [helper.make_node("Gather", [t, f"ids_{t}"], [f"y_{t}"], name=f"/embed_{t}")
                                     for t in names],
                          "g", [helper.make_tensor_value_info(f"ids_{t}", TensorProto.INT64, [1, None]) for t in names],
                          [helper.make_tensor_value_info(f"y_{t}", TensorProto.FLOAT, [1, None, dim])
                           for t in names],
                          [numpy_helper.from_array(a, t) for a, t in ((other, "other"), (small, "small"))])
    path = tmp_path / "e.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    made, left, exact = quantize_graph(path, Scheme(4, 32, True, 4, exact_blocks=True))
    assert made == 0 and exact["int8_16"] == 1 and sum(exact.values()) == 1
    ops = sorted(nd.op_type for nd in onnx.load(str(path)).graph.node)
    assert ops == ["Gather", "Gather", "GatherBlockQuantized"]
    x = np.array([[0, 5, 1023, 5, 77]], np.int64)
    yt, yo, ys = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"ids_table": x, "ids_other": x, "ids_small": x % 64})
    assert np.array_equal(yt, table[x]) and np.array_equal(yo, other[x]) and np.array_equal(ys, small[x % 64])
    # 1 byte a value plus a scale per 16 instead of 4 bytes: the floats left, plus under 40% of the table
    assert path.stat().st_size < other.nbytes + small.nbytes + 0.4 * table.nbytes


@pytest.mark.parametrize("rank", [2, 3, None])
def test_block_sums_at_known_and_unknown_rank(rank):
    """AveragePool at rank 3 (block means: the caller scales the offsets by 32), Reshape +
    ReduceSum at other known ranks, a 0/1 MatMul where the rank is unknown: the same sums."""
    from onnx import TensorProto, helper
    import onnxruntime as ort

    from exporter.gguf_blocks import blocksum_nodes

    k, inits, consts = 96, [], {}
    nodes, scale = blocksum_nodes("x", "s", k, rank, 17, inits, consts)
    expected = {None: ["MatMul"], 2: ["Reshape", "ReduceSum"], 3: ["AveragePool"]}[rank]
    assert [nd.op_type for nd in nodes] == expected and scale == (32.0 if rank == 3 else 1.0)
    dims = [None] * ((rank or 3) - 1) + [k]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], inits)
    x = np.random.default_rng(0).normal(size=(2, 3, k)[3 - (rank or 3):]).astype(np.float32)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (s,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(s * scale, x.reshape(*x.shape[:-1], k // 32, 32).sum(-1), rtol=1e-5, atol=1e-5)


def test_products_of_one_input_are_fused_exactly():
    """q, k, v (and gate, up) read the same input: one MatMul + Split gives identical outputs."""
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort

    from exporter.fuse_matmuls import fuse_shared_input_matmuls

    rng = np.random.default_rng(2)
    ws = {"q": (16, 16), "k": (16, 8), "v": (16, 8), "o": (8, 16)}
    nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [n], name=f"/{n}") for n in "qkv"]
    nodes.append(helper.make_node("MatMul", ["v", "Wo"], ["o"], name="/o"))  # another input: stays
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, ws[n][1]]) for n in "qko"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])], outs,
                          [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), f"W{n}") for n, s in ws.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.normal(size=(3, 16)).astype(np.float32)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert fuse_shared_input_matmuls(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Split", "MatMul"]
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    for a, b in zip(ref, got):
        assert np.array_equal(a, b)
