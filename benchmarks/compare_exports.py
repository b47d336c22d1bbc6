"""Is export B faster than export A? A paired A/B of two export folders on the same prompts.

    python -m benchmarks.compare_exports A B [--rounds 20] [--threads 2] [--new-tokens 32]
                                         [--thresholds never] [--thresholds-b T] [--out DIR]

For a change to the graphs (an encoding, a fusion) the full benchmark is too coarse: its rows
run minutes apart across runs, and this VM's speed drifts by more than such a change. Here the
two exports take turns within each round (the order alternates), each generating
`--new-tokens` greedy tokens for every prompt through the runtime (`Runtime.generate`, whole
calls: prefill included, so short prompts keep it small), and the
verdict is the median over rounds of B's tokens/s over A's, with a bootstrap 95% interval
(timing.paired_rounds, timing.ratio_interval): an interval that holds 1.00 means no difference beyond noise.
A and B may be one folder with different thresholds (`--thresholds never --thresholds-b 0.95`:
do the calibrated exits pay on this machine?). Writes compare.json / compare.md into --out
(default: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import paired_rounds, ratio_interval

PROMPTS = ("The history of the city begins", "def parse(line):\n    ", "She opened the door and",
           "In 1905 the physicist")


def one_pass(rt, prompts, new_tokens: int, thresholds) -> tuple[float, float, float]:
    """(tokens/s, mean depth at which tokens were decided, layer-positions run / the plain model's)."""
    results, t0 = [], time.perf_counter()
    for p in prompts:
        results.append(rt.generate(p, new_tokens, thresholds=thresholds))
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    works = [r.work() for r in results]
    return (tokens / seconds, float(np.mean([x.exit_layer for r in results for x in r.records])),
            sum(w["layer_positions"] for w in works) / max(sum(w["plain_layer_positions"] for w in works), 1))


def compare(a: Path, b: Path, *, rounds: int = 20, threads: int = 2, new_tokens: int = 32,
            thresholds="never", thresholds_b=None, prompts=PROMPTS) -> dict:
    from runtime import Runtime

    rts = [Runtime.load(p, threads=threads) for p in (a, b)]
    th = [thresholds, thresholds if thresholds_b is None else thresholds_b]
    for rt, t in zip(rts, th):  # warm-up, not timed
        one_pass(rt, prompts[:1], new_tokens, t)
    load_start = os.getloadavg()
    arms = {i: (lambda i=i: one_pass(rts[i], prompts, new_tokens, th[i])) for i in (0, 1)}
    passes, last = paired_rounds(arms, rounds, desc="A/B rounds")
    tps = [passes[0], passes[1]]
    depth, work = [last[i][1] for i in (0, 1)], [last[i][2] for i in (0, 1)]  # greedy: the same every pass
    ratios = [y / x for x, y in zip(*tps)]
    return {"a": str(a), "b": str(b), "rounds": rounds, "threads": threads, "new_tokens": new_tokens,
            "prompts": len(prompts), "thresholds": {"a": th[0], "b": th[1]},
            "tokens_per_second": {"a": float(np.median(tps[0])), "b": float(np.median(tps[1]))},
            "decided_at_layer": {"a": depth[0], "b": depth[1]}, "work_share": {"a": work[0], "b": work[1]},
            "spread": {k: float((max(v) - min(v)) / 2 / np.median(v)) for k, v in zip("ab", tps)},
            "b_over_a": float(np.median(ratios)), "b_over_a_ci95": ratio_interval(ratios),
            "passes": {"a": tps[0], "b": tps[1]}, "load_average": {"start": load_start, "end": os.getloadavg()}}


def markdown(res: dict) -> str:
    lo, hi = res["b_over_a_ci95"] or (float("nan"), float("nan"))
    verdict = "within noise" if lo <= 1.0 <= hi else ("B faster" if lo > 1.0 else "B slower")
    return "\n".join([
        f"# A/B: {res['b']} over {res['a']}", "",
        f"{res['rounds']} rounds, order alternating; each pass {res['prompts']} prompts x {res['new_tokens']} greedy "
        f"tokens, thresholds A {res['thresholds']['a']} / B {res['thresholds']['b']}, {res['threads']} thread(s). "
        "Load average at start "
        f"{res['load_average']['start'][0]:.2f}, at end {res['load_average']['end'][0]:.2f}.", "",
        "| export | tokens/s (median) | spread (half-range) | decided at layer | work (layer-positions vs plain) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {k.upper()}: {res[k]} | {res['tokens_per_second'][k]:.1f} | ±{res['spread'][k]:.0%} | "
          f"{res['decided_at_layer'][k]:.2f} | {res['work_share'][k]:.3f} |" for k in "ab"), "",
        f"B / A: **{res['b_over_a']:.3f}** [{lo:.3f}, {hi:.3f}] (median per-round ratio, bootstrap 95%): {verdict}.", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--thresholds", default="never", help="'never' (exits off, default) or a target such as 0.95")
    p.add_argument("--thresholds-b", help="B's thresholds, when they differ from A's")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for folder in (a.a, a.b):
        if not (folder / "manifest.json").is_file():
            p.error(f"{folder} is not an export folder (no manifest.json)")
    if a.rounds < 3:
        p.error("--rounds must be at least 3 for an interval")
    def spec(t):
        if t is None or t == "never":
            return t
        try:
            return float(t)
        except ValueError:
            p.error(f"thresholds must be 'never' or a target such as 0.95, got {t!r}")

    res = compare(a.a, a.b, rounds=a.rounds, threads=a.threads, new_tokens=a.new_tokens,
                  thresholds=spec(a.thresholds), thresholds_b=spec(a.thresholds_b))
    md = markdown(res)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "compare.json").write_text(json.dumps(res, indent=1))
        (a.out / "compare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
