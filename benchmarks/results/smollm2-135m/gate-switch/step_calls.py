"""Two exports' decode steps at the same thresholds, taking turns in one process.

    python benchmarks/results/smollm2-135m/gate-switch/step_calls.py A B THRESHOLDS ROUNDS

THRESHOLDS: "never" or a target (0.95: the calibrated default of runs/smol/onnx-int4-*).
Each round, each export (order alternating) pre-fills 128 tokens and runs 100 `Runtime.step`
decode steps (2 threads, a pool per session, as benchmarks.compare_exports loads them), every
segment's `session.run_with_iobinding` timed from outside. Prints per export the median step
time and the median time inside each segment's call, then the median over rounds of B's step
time over A's (> 1: B slower). Run A against a second path to A itself for the harness's own
bias (the export loaded second ran ~1% slower here).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np


def main(a: str, b: str, thresholds: str, rounds: str) -> int:
    from runtime import Runtime

    runs = []
    for e in (a, b):
        rt = Runtime.load(e, threads=2)
        events = []
        for j, backend in enumerate(rt.backends):
            def timed(*args, _run=backend.session.run_with_iobinding, _j=j, _ev=events, **kw):
                t0 = time.perf_counter()
                out = _run(*args, **kw)
                _ev.append((_j, t0, time.perf_counter()))
                return out
            backend.session.run_with_iobinding = timed
        th = rt.resolve_thresholds("never" if thresholds == "never" else float(thresholds))
        runs.append([e, rt, events, th, rt.new_cache()])
    res = {e: {"inside": {}, "step": []} for e in (a, b)}
    for r in range(int(rounds)):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            e, rt, events, th, cache = run
            cache = run[4] = rt.recycle_cache(cache)
            tok, *_ = rt.step(np.arange(100, 228, dtype=np.int64), cache, th)
            events.clear()
            t0 = time.perf_counter()
            for _ in range(100):
                tok, *_ = rt.step(np.array([tok]), cache, th)
            res[e]["step"].append((time.perf_counter() - t0) / 100 * 1e6)
            for j, s, t in events:
                res[e]["inside"].setdefault(j, []).append((t - s) * 1e6)
    for e in (a, b):
        inside = {j: statistics.median(v) for j, v in sorted(res[e]["inside"].items())}
        print(f"{e}: step {statistics.median(res[e]['step']):.0f} us; inside "
              + ", ".join(f"seg{j} {v:.0f}" for j, v in inside.items()) + f" (sum {sum(inside.values()):.0f})")
    ratio = np.array(res[b]["step"]) / np.array(res[a]["step"])
    print("per-round step ratio b/a median", f"{statistics.median(ratio):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
