"""Can onnxruntime's MatMulNBits hold a Q4_1 block exactly? The cost of each zero-point kind.

    python -m benchmarks.studies.matmulnbits_zero_points [--k 576] [--n 1536] [--calls 2000] [--seconds 0.5] [--out DIR]

A GGUF Q4_1 block of 32 weights is `w = d*q + m` (q in 0..15). MatMulNBits computes
`w = scale * (q - zero_point)`, so the block is exact with `zero_point = -m/d`, a float. The
operator accepts float zero points (same type as the scales) as well as packed 4-bit integers,
but whether its fast kernels do is what decides the exact int4 export's design
(exporter/gguf_blocks.py keeps `d*(q-8)` in MatMulNBits and adds the offsets in a float product
of the block sums: more nodes, benchmarks/results/smollm2-135m/graph-profile). This times one
decode-shaped call (M = 1) of a SmolLM2-sized weight with no zero points, packed uint8 zero
points and float zero points, at accuracy levels 0 (float) and 4 (int8 activations), and checks
the float-zero-point result against the dequantized weights.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report


def session(k: int, n: int, block: int, packed, scales, zp, accuracy: int, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(packed.reshape(n, k // block, block // 2), "B"),
             numpy_helper.from_array(scales.reshape(-1), "S")]
    inputs = ["X", "B", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp.reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=0.5, help="about this long per repeat (at most --calls calls)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    k, n, block = a.k, a.n, 32
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (n, k // block, block)).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = (rng.random((n, k // block)) * 0.01 + 0.001).astype(np.float32)
    zp_float = (rng.random((n, k // block)) * 20 - 2).astype(np.float32)  # -m/d of real Q4_1 blocks: any float
    zp_u8 = np.full((n, (k // block + 1) // 2), 0x88, np.uint8)  # 8 in both nibbles
    x = rng.standard_normal((1, k)).astype(np.float32)
    exact = x @ (scales[..., None] * (q.astype(np.float32) - zp_float[..., None])).reshape(n, k).T
    rows = []
    for name, zp in (("none", None), ("uint8 (packed 4-bit)", zp_u8), ("float", zp_float)):
        for acc in (0, 4):
            s = session(k, n, block, packed, scales, zp, acc, a.threads)
            y = s.run(None, {"X": x})[0]
            t = time.perf_counter()
            for _ in range(20):
                s.run(None, {"X": x})
            calls = max(20, min(a.calls, int(a.seconds / ((time.perf_counter() - t) / 20))))  # ~seconds a repeat
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                for _ in range(calls):
                    s.run(None, {"X": x})
                times.append((time.perf_counter() - t) / calls * 1e6)
            err = float(np.abs(y - exact).max() / np.abs(exact).max()) if name == "float" else None
            rows.append({"zero_points": name, "accuracy_level": acc, "us_per_call_median": round(float(np.median(times)), 1),
                         "us_per_call_range": [round(min(times), 1), round(max(times), 1)],
                         "max_rel_error_vs_dequantized": err})
    res = {"command": command_line("benchmarks.studies.matmulnbits_zero_points", argv), "onnxruntime": ort.__version__,
           "k": k, "n": n, "block": block, "threads": a.threads, "load_average": list(os.getloadavg()), "rows": rows}
    md = [f"# MatMulNBits zero points: one call, M=1, K={k}, N={n}, blocks of {block}, {a.threads} threads", "",
          f"`{res['command']}` (onnxruntime {ort.__version__}; load average {res['load_average'][0]:.2f} at the end)", "",
          "| zero points | accuracy level | us per call (median of repeats) | range | max rel. error vs dequantized |",
          "|---|---:|---:|---|---:|"]
    for r in rows:
        err = "" if r["max_rel_error_vs_dequantized"] is None else f"{r['max_rel_error_vs_dequantized']:.1e}"
        md.append(f"| {r['zero_points']} | {r['accuracy_level']} | {r['us_per_call_median']} | "
                  f"{r['us_per_call_range'][0]}-{r['us_per_call_range'][1]} | {err} |")
    write_report(a.out, "zero_points", res, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
