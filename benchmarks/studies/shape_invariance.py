"""Why exact decoding matches the full path bit for bit in fp32 but not in int4 (issue 24).

    python -m benchmarks.studies.shape_invariance EXPORT [EXPORT ...] [--threads 2] [--out DIR]

Exact decoding verifies drafted tokens in one call over S positions, and the full path decodes
one position per call. The two give the same tokens only if every kernel computes a position's
row the same way whatever the call's shape. This checks each onnxruntime kernel the graphs use
(a row of an S-position call against the same row in a call of its own), then the exports
themselves (the last position's logits after [prompt, a, b, c] fed one token per call, and with
a, b, c in one call), and times what removing int8 activations (accuracy level 0) would cost:
MatMulNBits at SmolLM2's shapes, one position per call. Timing wants quiet cores
(`python -m benchmarks.quiet LOG -- ...`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report

PROMPT = "The old house at the end of the street had been empty for years, and"


def _session(nodes, inputs, outputs, inits=(), threads: int = 2):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _nbits(k: int, n: int, bits: int, accuracy: int, threads: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    packed = rng.integers(0, 256, (n, k // 32, 32 * bits // 8)).astype(np.uint8)
    scales = (rng.random(n * (k // 32)) * 0.01 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=accuracy)
    return _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                    [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")], threads)


def kernel_rows(threads: int) -> list[dict]:
    """Max |row of an S-position call - the same row alone| for each kernel (0.0: invariant)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng, rows, vi = np.random.default_rng(0), [], helper.make_tensor_value_info
    a = rng.standard_normal((8, 576)).astype(np.float32)
    for acc in (0, 4):
        s = _nbits(576, 1536, 4, acc, threads, rng)
        alone = np.concatenate([s.run(None, {"A": a[i:i + 1]})[0] for i in range(8)])
        rows.append({"kernel": f"MatMulNBits 4-bit, accuracy level {acc}", "max_abs_diff":
                     float(np.abs(s.run(None, {"A": a})[0] - alone).max())})
    w = numpy_helper.from_array(rng.standard_normal((576, 1536)).astype(np.float32), "W")
    s = _session([helper.make_node("MatMul", ["A", "W"], ["Y"])], [vi("A", T.FLOAT, ["M", 576])],
                 [vi("Y", T.FLOAT, ["M", 1536])], [w], threads)
    alone = np.concatenate([s.run(None, {"A": a[i:i + 1]})[0] for i in range(8)])
    rows.append({"kernel": "MatMul fp32, same inner length", "max_abs_diff": float(np.abs(s.run(None, {"A": a})[0] - alone).max())})
    # attention weights @ V: a row of an S-call sums over P+S keys (the later ones weighted 0), alone over its own
    p_len, n = 100, 4
    v = rng.standard_normal((1, 9, p_len + n, 64)).astype(np.float32)
    probs = rng.random((1, 9, n, p_len + n)).astype(np.float32)
    for i in range(n):
        probs[:, :, i, p_len + i + 1:] = 0
    s = _session([helper.make_node("MatMul", ["P", "V"], ["O"])], [vi("P", T.FLOAT, [1, 9, "S", "T"]),
                 vi("V", T.FLOAT, [1, 9, "T", 64])], [vi("O", T.FLOAT, [1, 9, "S", 64])], threads=threads)
    together = s.run(None, {"P": probs, "V": v})[0]
    diff = max(float(np.abs(s.run(None, {"P": probs[:, :, i:i + 1, :p_len + i + 1], "V": v[:, :, :p_len + i + 1]})[0][:, :, 0]
                            - together[:, :, i]).max()) for i in range(n))
    rows.append({"kernel": "MatMul fp32, probs @ V (inner length = keys seen)", "max_abs_diff": diff})
    # the same with a group's 3 query heads as rows of one product (exporter/grouped_attention.py): >= 2 rows alone too
    g = 3
    pg = rng.random((1, 3, g, n, p_len + n)).astype(np.float32)
    for i in range(n):
        pg[..., i, p_len + i + 1:] = 0
    vg = np.ascontiguousarray(v[:, :3])
    s = _session([helper.make_node("MatMul", ["P", "V"], ["O"])], [vi("P", T.FLOAT, [1, 3, "S", "T"]),
                 vi("V", T.FLOAT, [1, 3, "T", 64])], [vi("O", T.FLOAT, [1, 3, "S", 64])], threads=threads)
    together = s.run(None, {"P": pg.reshape(1, 3, g * n, -1), "V": vg})[0].reshape(1, 3, g, n, 64)
    diff = max(float(np.abs(s.run(None, {"P": np.ascontiguousarray(pg[..., i, :p_len + i + 1]),
                                         "V": np.ascontiguousarray(vg[:, :, :p_len + i + 1])})[0]
                            - together[..., i, :]).max()) for i in range(n))
    rows.append({"kernel": "MatMul fp32, probs @ V, a group's 3 heads as rows (>= 2 rows alone too)", "max_abs_diff": diff})
    rows.append({"kernel": "GroupQueryAttention (past in a buffer, rotary)", "max_abs_diff": _gqa_rows(rng, threads)})
    rows.append({"kernel": "GroupQueryAttention, every call over >= 2 positions (a neighbour rides along)",
                 "max_abs_diff": _gqa_rows(rng, threads, alone_rows=2)})
    return rows


def _gqa_rows(rng, threads: int, alone_rows: int = 1) -> float:
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    h, kv, d, cap, p_len, n = 9, 3, 64, 256, 100, 4
    vi = helper.make_tensor_value_info
    cos, sin = (numpy_helper.from_array(rng.random((cap, d // 2)).astype(np.float32), x) for x in ("cos", "sin"))
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl", "cos", "sin"],
                            ["o", "ok", "ov"], domain="com.microsoft", do_rotary=1, kv_num_heads=kv, num_heads=h,
                            rotary_interleaved=0, scale=0.125)
    s = _session([node], [vi("q", T.FLOAT, [1, "S", h * d]), vi("k", T.FLOAT, [1, "S", kv * d]),
                          vi("v", T.FLOAT, [1, "S", kv * d]), vi("pk", T.FLOAT, [1, kv, cap, d]),
                          vi("pv", T.FLOAT, [1, kv, cap, d]), vi("sl", T.INT32, [1]), vi("tl", T.INT32, [])],
                 [vi("o", T.FLOAT, [1, "S", h * d]), vi("ok", T.FLOAT, [1, kv, cap, d]), vi("ov", T.FLOAT, [1, kv, cap, d])],
                 [cos, sin], threads)
    q, k, v = (rng.standard_normal((1, p_len + n + 1, c)).astype(np.float32) for c in (h * d, kv * d, kv * d))

    def call(a, b, pk, pv):
        return s.run(None, {"q": q[:, a:b], "k": k[:, a:b], "v": v[:, a:b], "pk": pk, "pv": pv,
                            "sl": np.array([b - 1], np.int32), "tl": np.array(b, np.int32)})

    _, pk, pv = call(0, p_len, np.zeros((1, kv, cap, d), np.float32), np.zeros((1, kv, cap, d), np.float32))
    together = call(p_len, p_len + n, pk, pv)[0]
    alone = []
    for i in range(n):  # with alone_rows=2 the next position rides along and is written over by the next call
        o, pk, pv = call(p_len + i, p_len + i + alone_rows, pk, pv)
        alone.append(o[:, :1])
    return float(np.abs(np.concatenate(alone, axis=1) - together).max())


def export_rows(folder: str) -> dict:
    """The last position's logits after [prompt, a, b, c]: one token per call vs a, b, c in one call."""
    from runtime import Runtime

    rt = Runtime.load(folder)
    never = [float("inf")] * len(rt.manifest.segments)
    prompt = rt.encode(PROMPT).tolist()

    def last(chunks, pad=False):
        cache, out = rt.new_cache(), None
        if pad:
            cache.pad = True  # exact decoding's padding of one-position calls (KV buffer)
        for ids in chunks:
            out = rt.step(np.array(ids), cache, never, want_logits=True)
        return out

    def diff(a, b):
        x, y = np.asarray(a[3]), np.asarray(b[3])
        both = np.isfinite(x) & np.isfinite(y)
        return float(np.abs(x[both] - y[both]).max())

    drafts = list(rt.generate(prompt, 3, thresholds="never", stop_at_eos=False).tokens)  # the model's own tokens
    one, together = last([prompt] + [[t] for t in drafts]), last([prompt, drafts])
    buffer = rt.manifest.kv_cache.layout == "buffer"
    padded = diff(last([prompt] + [[t] for t in drafts], pad=True), together) if buffer else None
    return {"export": folder, "precision": rt.manifest.precision, "layout": rt.manifest.kv_cache.layout,
            "row_invariant": rt.manifest.row_invariant, "max_abs_logit_diff": diff(one, together),
            "max_abs_logit_diff_padded": padded, "same_top1": bool(one[0] == together[0])}


def accuracy_cost(threads: int, seconds: float) -> list[dict]:
    """us per MatMulNBits call (M=1) at SmolLM2's 4-bit shapes, accuracy level 0 vs 4."""
    rng, rows = np.random.default_rng(1), []
    for k, n in ((576, 1728), (576, 576), (576, 3072), (1536, 576)):
        r = {"k": k, "n": n}
        for acc in (0, 4):
            s, a = _nbits(k, n, 4, acc, threads, rng), rng.standard_normal((1, k)).astype(np.float32)
            for _ in range(50):
                s.run(None, {"A": a})
            times = []
            for _ in range(5):
                t, calls = time.perf_counter(), 0
                while time.perf_counter() - t < seconds:
                    s.run(None, {"A": a})
                    calls += 1
                times.append((time.perf_counter() - t) / calls * 1e6)
            r[f"us_level_{acc}"] = round(float(np.median(times)), 1)
        r["level0_over_level4"] = round(r["us_level_0"] / r["us_level_4"], 2)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=0.3, help="per timing repeat")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    res = {"command": command_line("benchmarks.studies.shape_invariance", argv), "onnxruntime": ort.__version__,
           "threads": a.threads, "kernels": kernel_rows(a.threads), "exports": [export_rows(f) for f in a.exports],
           "accuracy_cost": accuracy_cost(a.threads, a.seconds), "load_average": [load0, os.getloadavg()[0]]}
    md = ["# Is a position computed the same in a multi-position call? (onnxruntime " + ort.__version__ + ")", "",
          f"`{res['command']}`; {a.threads} threads; load average {load0:.2f} at the start, "
          f"{res['load_average'][1]:.2f} at the end.", "",
          "| kernel: a row of an S-position call vs the same row alone | max abs difference |", "|---|---:|"]
    md += [f"| {r['kernel']} | {r['max_abs_diff']:.2g} |" for r in res["kernels"]]
    md += ["", "| export | precision | KV layout | row-invariant (manifest) | last logits: one token per call vs drafts "
           "in one call, max abs diff | the same, one-token calls padded (exact decoding, KV buffer) | same top-1 |",
           "|---|---|---|---|---:|---:|---|"]
    md += [f"| {r['export']} | {r['precision']} | {r['layout']} | {r['row_invariant']} | {r['max_abs_logit_diff']:.3g} | "
           f"{'-' if r['max_abs_logit_diff_padded'] is None else format(r['max_abs_logit_diff_padded'], '.3g')} | "
           f"{r['same_top1']} |" for r in res["exports"]]
    md += ["", "| MatMulNBits 4-bit, M=1 | us, accuracy level 0 (fp32 activations) | us, level 4 (int8) | level 0 / level 4 |",
           "|---|---:|---:|---:|"]
    md += [f"| K={r['k']}, N={r['n']} | {r['us_level_0']} | {r['us_level_4']} | {r['level0_over_level4']}x |"
           for r in res["accuracy_cost"]]
    write_report(a.out, "shape_invariance", res, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
