"""GPU benchmark: TensorRT engines vs onnxruntime (CPU, CUDA) on one export folder.

Why: CI has no GPU, so the TensorRT path is only tested there against fakes. This script is
what to run the first time a GPU machine is at hand: it measures engine build time, checks
that every GPU path produces the same greedy tokens as onnxruntime on the CPU (the reference
the rest of the test suite trusts), and measures tokens/s of the full chain and of the
calibrated early-exit chain (target 0.95 by default).

Setup on the GPU machine (tensorrt cannot be installed on the project's CPU machines)::

    pip install -e '.[export]' 'tensorrt>=10' cuda-python
    pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.32.0   # optional: the ORT-CUDA column
    lama export CHECKPOINT --out runs/bench-onnx [--precision fp16]       # or any existing export folder

Run::

    python -m benchmarks.studies.gpu_bench runs/bench-onnx --tokens 64 --out gpu_bench.json

The export folder is copied (engines are built in the copy, the original stays as it was).
Backends: ort-cpu (reference), ort-cuda (skipped with the reason when onnxruntime-gpu or its
CUDA libraries are missing), tensorrt (KV cache kept on the GPU between tokens) and
tensorrt-host-kv (the KV copied to the host and back every call, to show what that costs).
The JSON holds, per backend and mode ("full" = no exits, "target" = calibrated exits):
tokens/s (decode), first-token ms, mean layers, and token parity with ort-cpu per prompt.
fp16 exports may legitimately diverge after a near-tie; the first divergence is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from runtime import ManifestError, Runtime
from runtime import tensorrt as tb

PROMPTS = ["The old house at the end of the street", "Once upon a time, a little robot",
           "The capital of France is", "def fibonacci(n):"]
BACKENDS = {"ort-cpu": None, "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt": "tensorrt", "tensorrt-host-kv": "tensorrt"}


def load(folder: Path, backend: str) -> Runtime:
    rt = Runtime.load(folder, providers=BACKENDS[backend])
    if backend == "tensorrt-host-kv":
        for b in rt.backends:
            b.device_outputs = set()
    return rt


def parity(ref: list[int], got: list[int]) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None and len(ref) != len(got):
        first = min(len(ref), len(got))
    return {"identical": first is None, "first_divergence": first}


def bench(rt: Runtime, prompts: list[str], tokens: int, thresholds, repeat: int) -> dict:
    rt.generate(prompts[0], 4, thresholds=thresholds)  # warm-up: lazy allocations, autotuning
    best, outs = None, {}
    for _ in range(repeat):
        results = [rt.generate(p, tokens, thresholds=thresholds, stop_at_eos=False) for p in prompts]
        decode_s = sum(sum(r.seconds for r in res.records[1:]) for res in results)
        decode_n = sum(max(len(res.records) - 1, 0) for res in results)
        run = {"tokens_per_s": decode_n / decode_s if decode_s else None,
               "first_token_ms": 1e3 * sum(res.first_token_seconds for res in results) / len(results),
               "mean_layers": sum(res.mean_layers for res in results) / len(results)}
        if best is None or (run["tokens_per_s"] or 0) > (best["tokens_per_s"] or 0):
            best = run
        outs = {p: list(res.tokens) for p, res in zip(prompts, results)}
    return {**best, "tokens": outs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", type=Path, help="a `lama export` folder (ONNX graphs + manifest.json)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=0.95, help="calibrated target for the early-exit mode")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (the best is kept)")
    p.add_argument("--workspace-gb", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-sequence", type=int, default=512)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    folder = work / a.export.name
    shutil.copytree(a.export, folder)
    report: dict = {"export": str(a.export), "tokens": a.tokens, "prompts": PROMPTS, "target": a.target,
                    "build": None, "runs": {}, "skipped": {}}
    try:
        trt, cuda = tb.load_tensorrt()
        report["device"] = {"name": cuda.device_name(), "compute_capability": cuda.compute_capability(),
                            "tensorrt": str(trt.__version__)}
        t0 = time.perf_counter()
        m = tb.build_engines_on_device(folder, a.workspace_gb, {"batch": a.max_batch, "sequence": a.max_sequence})
        report["build"] = {"seconds": time.perf_counter() - t0, "precision": m.precision,
                           "segments": [{"index": s.index, "seconds": s.engine["build_seconds"],
                                         "bytes": s.engine["size"]} for s in m.segments]}
    except (RuntimeError, ValueError) as e:
        report["skipped"]["tensorrt"] = str(e)
        print(f"no TensorRT engines: {e}", file=sys.stderr)

    try:
        Runtime.load(folder).manifest.thresholds_for(a.target)
        modes = {"full": "never", "target": a.target}
    except ManifestError as e:
        modes = {"full": "never", "target": None}  # the export's default thresholds
        report["skipped"]["target"] = f"{e}; used the export's default thresholds"

    for backend in a.backends:
        if backend.startswith("tensorrt") and report["build"] is None:
            report["skipped"][backend] = report["skipped"]["tensorrt"]
            continue
        try:
            t0 = time.perf_counter()
            rt = load(folder, backend)
            load_s = time.perf_counter() - t0
        except (ManifestError, RuntimeError, ValueError) as e:
            report["skipped"][backend] = str(e)
            print(f"{backend}: skipped ({str(e)[:200]})", file=sys.stderr)
            continue
        report["runs"][backend] = {"load_seconds": load_s}
        for mode, th in modes.items():
            report["runs"][backend][mode] = bench(rt, PROMPTS, a.tokens, th, a.repeat)
        del rt

    ref = report["runs"].get("ort-cpu")
    for backend, run in report["runs"].items():
        for mode in modes:
            if ref is not None:
                run[mode]["parity_vs_ort_cpu"] = {p: parity(ref[mode]["tokens"][p], run[mode]["tokens"][p])
                                                  for p in PROMPTS}
        print(f"{backend:18s} " + "  ".join(
            f"{mode}: {run[mode]['tokens_per_s'] or 0:7.1f} tok/s, {run[mode]['mean_layers']:.1f} layers"
            + ("" if "parity_vs_ort_cpu" not in run[mode] else
               f", parity {sum(v['identical'] for v in run[mode]['parity_vs_ort_cpu'].values())}/{len(PROMPTS)}")
            for mode in modes))
    if report["build"]:
        print(f"engine build: {report['build']['seconds']:.1f} s for {len(report['build']['segments'])} segments")
    a.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
