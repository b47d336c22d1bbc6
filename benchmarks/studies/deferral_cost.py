"""Cost of one call vs. the positions it carries: what bounds the deferral (runtime max_pending).

    python -m benchmarks.studies.deferral_cost EXPORT_DIR [--sizes 1 2 4 8 16 32 64] [--past 64] [--repeats 30]

With the `defer` KV policy, positions that exited early wait, and the next token that goes
deep carries them through the deeper segments in one call. A call on S positions costs
c(S); if c(S) grows slowly, a long catch-up is cheap per position but makes that one token
slow (a latency spike); if it grows fast, there is nothing to gain from waiting. This times
every segment of an export (the whole chain, as a full catch-up would run) on S new positions
after `past` cached ones, median of `repeats` calls, and writes deferral_cost.json/.md beside
it (or to --out). It needs only the runtime (numpy + onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np



def time_chain(rt, sizes: list[int], past: int, repeats: int) -> dict[int, float]:
    """Median seconds of one pass of every segment over S new positions after `past` cached ones."""
    from runtime.chain import StepStats

    rng = np.random.default_rng(0)
    never = rt.resolve_thresholds("never")
    vocab = rt.manifest.model.vocab_size
    out = {}
    for s in sizes:
        base = rt.new_cache()
        rt.step(rng.integers(0, vocab, size=past), base, never)  # the cached context
        ids = rng.integers(0, vocab, size=s)
        times = []
        for _ in range(repeats):
            cache = rt.new_cache()
            cache.segments = [type(st)(list(st.keys), list(st.values), st.length) for st in base.segments]
            cache.position = base.position
            t0 = time.perf_counter()
            rt.step(ids, cache, never, stats=StepStats())
            times.append(time.perf_counter() - t0)
        out[s] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--past", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="folder for deferral_cost.json/.md (default: the export folder)")
    a = p.parse_args(argv)
    from runtime import Runtime

    rt = Runtime.load(a.export, threads=a.threads)
    t = time_chain(rt, a.sizes, a.past, a.repeats)
    one = t[a.sizes[0]]
    rows = [{"positions": s, "ms": v * 1e3, "vs_one": v / one, "ms_per_position": v * 1e3 / s} for s, v in t.items()]
    out = a.out or a.export
    out.mkdir(parents=True, exist_ok=True)
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = {"export": str(a.export), "model": rt.manifest.model.base_model, "past": a.past, "repeats": a.repeats,
           "threads": a.threads, "load_average_end": load, "rows": rows}
    (out / "deferral_cost.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Cost of one pass of the whole chain vs. positions carried ({res['model']})", "",
             f"`python -m benchmarks.studies.deferral_cost {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"past {a.past} cached positions, median of {a.repeats} calls, {a.threads} thread(s); load average "
             f"{load if load is None else round(load, 1)} at the end on {os.cpu_count()} cores: on shared cores "
             "read the ratios, not the milliseconds.", "",
             "| positions | ms | x one position | ms per position |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['positions']} | {r['ms']:.2f} | {r['vs_one']:.2f} | {r['ms_per_position']:.3f} |" for r in rows]
    (out / "deferral_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
