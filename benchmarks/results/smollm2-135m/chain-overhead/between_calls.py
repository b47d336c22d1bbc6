"""What the runtime does between its onnxruntime calls, per decode step (exits off).

    [PYTHONPATH=DIR] python benchmarks/results/smollm2-135m/chain-overhead/between_calls.py EXPORT [EXPORT ...]

For each export: Runtime.load (2 threads, shared pool), a 128-token prefill, then 400 steps of
`Chain.step` one token at a time (positions 128-200, cut back to 128 by `truncate`), every
segment's `session.run_with_iobinding` timed from the outside. Prints the median gap from one
call's return to the next call's start, per pair of segments ("0->1": segment 0 returned, the
runtime prepared segment 1; "2->0": the end of one step and the start of the next, where
`step()` returns its token and takes the next), and the median time inside each call.
`PYTHONPATH=DIR` imports the runtime from DIR instead (e.g. `git archive COMMIT runtime | tar -x -C DIR`:
the code before a change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("exports", nargs="+")
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args(argv)
    import numpy as np

    from runtime import Runtime

    for e in a.exports:
        rt = Runtime.load(e, threads=2, thread_pool="shared")
        ev = []
        for j, b in enumerate(rt.backends):
            def timed(*args, _run=b.session.run_with_iobinding, _j=j, **kw):
                t0 = time.perf_counter()
                out = _run(*args, **kw)
                ev.append((_j, t0, time.perf_counter()))
                return out
            b.session.run_with_iobinding = timed
        cache = rt.new_cache()
        never = rt.resolve_thresholds("never")
        tok, *_ = rt.step(np.arange(100, 228, dtype=np.int64), cache, never)
        for _ in range(a.steps):
            tok, *_ = rt.step(np.array([tok]), cache, never)
            if cache.position >= 200:
                cache.truncate(128)
        ev = ev[-(a.steps // 2) * len(rt.backends):]  # the second half
        gaps, runs = {}, {}
        for (j0, _, e0), (j1, s1, _) in zip(ev, ev[1:]):
            gaps.setdefault(f"{j0}->{j1}", []).append((s1 - e0) * 1e6)
        for j, s, e1 in ev:
            runs.setdefault(j, []).append((e1 - s) * 1e6)
        med = {k: statistics.median(v) for k, v in gaps.items()}
        inside = {k: statistics.median(v) for k, v in runs.items()}
        print(f"{e}: between calls {sum(med.values()):.0f} us/token "
              f"({', '.join(f'{k} {v:.0f}' for k, v in med.items())}); inside calls {sum(inside.values()) / 1e3:.3f} "
              f"ms/token ({', '.join(f'segment {k} {v / 1e3:.3f}' for k, v in inside.items())})")
        del rt, cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
