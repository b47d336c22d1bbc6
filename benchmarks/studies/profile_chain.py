"""Where a decoded token's time goes in the segment chain: kernels, onnxruntime, numpy, Python.

    python -m benchmarks.studies.profile_chain EXPORT_DIR [--threshold never|0.95] [--threads 2] [--out DIR]

Works on any `lama export` folder (fp32, fp16, int8, int4; head or gate mode). It loads the
export with the ordinary Runtime, swaps each segment's onnxruntime session for one with the
same settings plus onnxruntime's own profiler (`SessionOptions.enable_profiling`), wraps each
session's `run()`, the runtime's `step()` and the KV cache's methods with clocks, generates
greedily, and splits every decode token (the prefill step is left out) into:

    kernels          sum of onnxruntime's per-node kernel times (its profiler's "Node" events)
    ort executor     onnxruntime's `model_run` time minus its kernels: scheduling, allocations
    binding          run() as Python sees it minus `model_run`: numpy -> OrtValue inputs, outputs
                     back to numpy, the Python/C++ crossing
    KV cache         the cache object's methods (numpy concatenation / copies of the past KV),
                     not counting the segment runs they make themselves (the in-place buffer does)
    Python glue      step() minus all of the above: feeds, thresholds, bookkeeping
    detokenize       generate() minus step(): incremental decoding of the text

per segment and in total, plus the kernel time per operator type (MatMulNBits vs MatMul vs
attention ops...). Profiling adds time per node (on SmolLM2's int4 chain it nearly doubled the
step), so an unprofiled pass is timed too, with the same clock.
Writes profile.json and profile.md to --out (default: EXPORT_DIR/../profile-<name>).
Timings on shared cores are indications, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


PROMPT = ("Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
          "who had spent his whole life building clocks that told more than the time.")


class Clock:
    """Accumulates wall time per key and per decode step. Clocked calls nest (the KV buffer's
    `run()` calls the segment's `run_bound()`, `step()` calls both): each key gets its own time
    only (exclusive), so the parts add up to step() and none is counted twice."""

    def __init__(self):
        self.step = -1  # -1 until the first step() (prefill is step 0)
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._children: list[float] = []  # per open clocked call: time spent in clocked calls inside it

    def add(self, key: str, seconds: float) -> None:
        if self.step >= 1:  # decode steps only
            self.total[key] += seconds
            self.calls[key] += 1

    def call(self, key: str, fn, *a, **k):
        """fn(*a, **k) with its time minus the clocked calls inside it added to `key`."""
        self._children.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            elapsed = time.perf_counter() - t0
            inner = self._children.pop()
            if self._children:
                self._children[-1] += elapsed
            self.add(key, elapsed - inner)

    def timed(self, key: str, fn):
        return lambda *a, **k: self.call(key, fn, *a, **k)


def _profiling_session(path: Path, threads: int | None, prefix: Path, providers: list[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()  # the runtime's settings (runtime/backends.py) + the profiler
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def instrument(rt, clock: Clock, threads: int | None, out: Path) -> list[tuple[str, object, list]]:
    """Profiling sessions and clocks on every graph; returns (name, backend, [run step ids])."""
    graphs = [(s.file, b) for s, b in zip(rt.manifest.segments, rt.backends)]
    graphs += [(h.file, b) for h, b in zip(rt.manifest.heads, rt.head_backends)]
    wired = []
    for name, backend in graphs:
        if not hasattr(backend, "session"):
            raise SystemExit(f"{name}: backend {type(backend).__name__} is not onnxruntime; profile needs onnxruntime")
        backend.session = _profiling_session(Path(rt.folder) / name, threads, out / Path(name).stem,
                                             backend.session.get_providers())
        steps: list[int] = []
        # run(feeds), and run_bound(binding, feeds) where the KV buffers are bound in place (IOBinding)
        for method in ("run", "run_bound"):
            inner = getattr(backend, method, None)
            if inner is None:
                continue

            def run(*args, _inner=inner, _name=name, _steps=steps):
                _steps.append(clock.step)
                clock.add(f"bytes_in:{_name}", sum(getattr(v, "nbytes", 0) for v in args[-1].values()))
                return clock.call(f"run:{_name}", _inner, *args)

            setattr(backend, method, run)
        wired.append((name, backend, steps))
    step = rt.step

    def timed_step(*a, **k):
        clock.step += 1
        t0 = time.perf_counter()
        try:
            return clock.call("glue", step, *a, **k)  # exclusive: step() minus runs and KV cache work
        finally:
            clock.add("step", time.perf_counter() - t0)

    rt.step = timed_step
    new_cache = rt.new_cache

    def cache_with_clocks():
        cache = new_cache()
        for attr in dir(type(cache)):  # whatever methods the KV cache has: they are the numpy work
            if not attr.startswith("_") and callable(getattr(type(cache), attr, None)):
                try:
                    setattr(cache, attr, clock.timed("kv_cache", getattr(cache, attr)))
                except (AttributeError, TypeError):
                    pass
        return cache

    rt.new_cache = cache_with_clocks
    return wired


def kernel_split(profile_file: str, steps: list[int]) -> tuple[float, float, dict[str, float]]:
    """(model_run seconds, kernel seconds, kernel seconds per op type) over the decode runs."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    if len(runs) != len(steps):
        raise RuntimeError(f"{profile_file}: {len(runs)} profiled runs for {len(steps)} run() calls")
    windows = [(r["ts"], r["ts"] + r["dur"]) for r, s in zip(runs, steps) if s >= 1]
    model_run = sum(b - a for a, b in windows) / 1e6
    starts = np.array([a for a, _ in windows])
    ends = np.array([b for _, b in windows])
    kernels = 0.0
    by_op: dict[str, float] = defaultdict(float)
    for e in nodes:
        i = np.searchsorted(starts, e["ts"], side="right") - 1
        if i >= 0 and e["ts"] <= ends[i]:
            kernels += e["dur"] / 1e6
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e6
    return model_run, kernels, dict(by_op)


def profile(export_dir: Path, prompt: str, new_tokens: int, threshold, threads: int | None, out: Path) -> dict:
    from runtime import Runtime

    out.mkdir(parents=True, exist_ok=True)
    rt = Runtime.load(export_dir, threads=threads)
    # an unprofiled pass first: the reference for what profiling itself costs (and a warm-up)
    # (decode steps only, by the runtime's own per-token clock: the same measure as the profiled
    # steps below, so that their ratio is what profiling costs, not the prefill)
    rt.generate(prompt, new_tokens, thresholds=threshold, stop_at_eos=False)
    plain = list(rt.stream(prompt, new_tokens, thresholds=threshold, stop_at_eos=False))
    plain_s = sum(r.seconds for r in plain[1:])
    clock = Clock()
    wired = instrument(rt, clock, threads, out)
    t0 = time.perf_counter()
    records = list(rt.stream(prompt, new_tokens, thresholds=threshold, stop_at_eos=False))
    gen_s = time.perf_counter() - t0
    decode_tokens = len(records) - 1
    if decode_tokens < 1:
        raise SystemExit("need at least 2 new tokens to profile decoding")
    gen_decode_s = sum(r.seconds for r in records[1:])  # the runtime's own per-token clock (step only)
    segments, by_op = [], defaultdict(float)
    for name, backend, steps in wired:
        model_run, kernels, ops = kernel_split(backend.session.end_profiling(), steps)
        run_s = clock.total.get(f"run:{name}", 0.0)
        calls = clock.calls.get(f"run:{name}", 0)
        for k, v in ops.items():
            by_op[k] += v
        segments.append({"graph": name, "calls_per_token": calls / decode_tokens,
                         "run_ms": 1e3 * run_s / decode_tokens, "kernels_ms": 1e3 * kernels / decode_tokens,
                         "ort_executor_ms": 1e3 * (model_run - kernels) / decode_tokens,
                         "binding_ms": 1e3 * (run_s - model_run) / decode_tokens,
                         "bytes_in_per_call": clock.total.get(f"bytes_in:{name}", 0.0) / max(calls, 1)})
    step_s = clock.total["step"]
    kv_s = clock.total.get("kv_cache", 0.0)
    per_tok = lambda s: 1e3 * s / decode_tokens  # noqa: E731
    kern = sum(s["kernels_ms"] for s in segments)
    totals = {"token_ms": per_tok(step_s), "kernels_ms": kern,
              "ort_executor_ms": sum(s["ort_executor_ms"] for s in segments),
              "binding_ms": sum(s["binding_ms"] for s in segments), "kv_cache_ms": per_tok(kv_s),
              "python_glue_ms": per_tok(clock.total.get("glue", 0.0)),
              "run_calls_per_token": sum(s["calls_per_token"] for s in segments)}
    layers = [r.exit_layer for r in records[1:]]
    return {
        "export": str(export_dir), "precision": rt.manifest.precision, "threads": threads, "threshold": threshold,
        "prompt_tokens": int(len(rt.encode(prompt))), "new_tokens": len(records), "decode_tokens": decode_tokens,
        "mean_layers": float(np.mean(layers)), "num_layers": rt.manifest.model.num_layers,
        "unprofiled_tokens_per_second": (len(plain) - 1) / plain_s if plain_s else None,
        "profiled_step_tokens_per_second": decode_tokens / gen_decode_s if gen_decode_s else None,
        "detokenize_ms": 1e3 * (gen_s - sum(r.seconds for r in records)) / len(records),
        "totals": totals, "segments": segments,
        "kernels_by_op_ms": {k: 1e3 * v / decode_tokens for k, v in sorted(by_op.items(), key=lambda x: -x[1])},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def markdown(p: dict) -> str:
    t = p["totals"]
    share = lambda x: f"{x / t['token_ms']:.0%}" if t["token_ms"] else "–"  # noqa: E731
    lines = [f"# Chain profile: {p['export']}", "",
             f"{p['precision']}, threshold {p['threshold']!r}, {p['threads']} thread(s), {p['prompt_tokens']}-token "
             f"prompt, {p['decode_tokens']} decode tokens (prefill left out), mean {p['mean_layers']:.1f} of "
             f"{p['num_layers']} layers per token; {t['run_calls_per_token']:.2f} onnxruntime calls per token. "
             f"Load average {p['load_average']}: shared cores, indications only.", "",
             "| per decode token | ms | share |", "|---|---:|---:|"]
    for key, label in (("kernels_ms", "kernels (onnxruntime profiler)"), ("ort_executor_ms", "onnxruntime executor"),
                       ("binding_ms", "run() binding: numpy <-> OrtValue, Python/C++"),
                       ("kv_cache_ms", "KV cache methods (numpy)"), ("python_glue_ms", "Python glue in step()")):
        lines.append(f"| {label} | {t[key]:.3f} | {share(t[key])} |")
    lines += [f"| **step() total** | **{t['token_ms']:.3f}** | 100% |",
              f"| detokenize (generate() outside step(), per token) | {p['detokenize_ms']:.3f} | |", "",
              f"Unprofiled: {p['unprofiled_tokens_per_second']:.1f} tokens/s; profiled steps: "
              f"{p['profiled_step_tokens_per_second']:.1f} tokens/s (decode steps, both by the runtime's clock). "
              "The profiler adds its own cost per node, so the many small nodes (offset products, Reshape, Add) "
              "weigh more in these shares than they do unprofiled.", "",
              "| graph | calls/token | run() ms | kernels ms | executor ms | binding ms | input MB/call |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in p["segments"]:
        lines.append(f"| {s['graph']} | {s['calls_per_token']:.2f} | {s['run_ms']:.3f} | {s['kernels_ms']:.3f} | "
                     f"{s['ort_executor_ms']:.3f} | {s['binding_ms']:.3f} | {s['bytes_in_per_call'] / 1e6:.2f} |")
    lines += ["", "| operator | kernel ms/token |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in list(p["kernels_by_op_ms"].items())[:12]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threshold", default="never", help="'never' (exits off), a target such as 0.95, or 'default'")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per session (default: onnxruntime's)")
    ap.add_argument("--out", type=Path, help="folder for profile.json / profile.md and onnxruntime's traces")
    a = ap.parse_args(argv)
    th = None if a.threshold == "default" else a.threshold if a.threshold == "never" else float(a.threshold)
    out = a.out or a.export_dir.resolve().parent / f"profile-{a.export_dir.resolve().name}"
    p = profile(a.export_dir, a.prompt, a.new_tokens, th, a.threads, out)
    (out / "profile.json").write_text(json.dumps(p, indent=1))
    (out / "profile.md").write_text(markdown(p))
    print(markdown(p))
    print(f"wrote {out}/profile.json, profile.md (+ onnxruntime traces)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
