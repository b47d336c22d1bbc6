"""Does recycling the KV buffers between generations pay? A paired A/B in one process.

    python -m benchmarks.studies.kv_recycle_ab EXPORT [--rounds 15] [--threads 2] [--new-tokens 32] [--out DIR]

A: every generation allocates a fresh KV buffer cache (what the runtime did before
Chain.recycle_cache); B: the previous sequence's buffers are emptied and used again (the
default). The two take turns within each round over the same prompts (compare_exports.PROMPTS),
whole `generate` calls (prefill included: that is where a fresh buffer's page faults land);
the verdict is the median per-round ratio B/A with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.compare_exports import PROMPTS
from benchmarks.report import command_line, write_report
from benchmarks.timing import paired_rounds, ratio_interval


def one_pass(rt, new_tokens: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = [rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False) for p in PROMPTS]
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - t0), results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from runtime import Runtime

    fresh, recycled = (Runtime.load(a.export, threads=a.threads) for _ in range(2))
    if fresh.manifest.kv_cache.layout != "buffer":
        p.error(f"{a.export} uses the {fresh.manifest.kv_cache.layout} KV layout: nothing to recycle")
    fresh.recycle_cache = lambda old: fresh.new_cache()  # A: the behaviour before recycling
    arms = {"A: fresh buffers": fresh, "B: recycled buffers": recycled}
    for rt in arms.values():
        one_pass(rt, 4)
    load = os.getloadavg()
    tps, last = paired_rounds({k: (lambda rt=rt: one_pass(rt, a.new_tokens)) for k, rt in arms.items()}, a.rounds,
                              desc="A/B rounds")
    tokens = {k: [x.tokens for x in last[k][1]] for k in arms}  # each arm's tokens in the last round
    ratios = [b / x for x, b in zip(*tps.values())]
    res = {"command": command_line("benchmarks.studies.kv_recycle_ab", argv),
           "export": str(a.export), "rounds": a.rounds, "threads": a.threads, "new_tokens": a.new_tokens,
           "prompts": len(PROMPTS), "tokens_per_second": {k: float(np.median(v)) for k, v in tps.items()},
           "spread": {k: float((max(v) - min(v)) / 2 / np.median(v)) for k, v in tps.items()},
           "b_over_a": float(np.median(ratios)), "b_over_a_ci95": ratio_interval(ratios),
           "same_tokens": tokens["A: fresh buffers"] == tokens["B: recycled buffers"], "passes": tps,
           "load_average": {"start": load, "end": os.getloadavg()}}
    lo, hi = res["b_over_a_ci95"]
    md = "\n".join([f"# KV buffers recycled between generations vs fresh: {a.export}", "",
                    f"`{res['command']}`", "",
                    f"{a.rounds} rounds, order alternating; each pass {len(PROMPTS)} prompts x {a.new_tokens} greedy "
                    f"tokens (whole generate calls), exits off, {a.threads} thread(s); load average "
                    f"{load[0]:.2f} at start, {res['load_average']['end'][0]:.2f} at end. Same tokens: "
                    f"{res['same_tokens']}.", "",
                    "| arm | tokens/s (median) | spread |", "|---|---:|---:|",
                    *(f"| {k} | {res['tokens_per_second'][k]:.1f} | ±{res['spread'][k]:.0%} |" for k in arms), "",
                    f"B / A: **{res['b_over_a']:.3f}** [{lo:.3f}, {hi:.3f}] (median per-round ratio, bootstrap 95%).",
                    ""])
    write_report(a.out, "kv_recycle", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
