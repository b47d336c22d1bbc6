"""Is export B faster than export A? A paired A/B of two export folders on the same prompts.

    python benchmarks/compare_exports.py A B [--rounds 20] [--threads 2] [--new-tokens 32]
                                         [--thresholds never] [--out DIR]

For a change to the graphs (an encoding, a fusion) the full benchmark is too coarse: its rows
run minutes apart across runs, and this VM's speed drifts by more than such a change. Here the
two exports take turns within each round (the order alternates), each generating
`--new-tokens` greedy tokens for every prompt through the runtime (`Runtime.generate`, whole
calls: prefill included, so short prompts keep it small), and the
verdict is the median over rounds of B's tokens/s over A's, with a bootstrap 95% interval
(timing.ratio_interval): an interval that holds 1.00 means no difference beyond noise.
Writes compare.json / compare.md into --out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
from timing import ratio_interval  # noqa: E402 (beside this script)

PROMPTS = ("The history of the city begins", "def parse(line):\n    ", "She opened the door and",
           "In 1905 the physicist")


def tokens_per_second(rt, prompts, new_tokens: int, thresholds) -> float:
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        n += len(rt.generate(p, new_tokens, thresholds=thresholds).tokens)
    return n / (time.perf_counter() - t0)


def compare(a: Path, b: Path, *, rounds: int = 20, threads: int = 2, new_tokens: int = 32,
            thresholds: str = "never", prompts=PROMPTS) -> dict:
    from tqdm.auto import tqdm

    from runtime import Runtime

    rts = [Runtime.load(p, threads=threads) for p in (a, b)]
    for rt in rts:  # warm-up, not timed
        tokens_per_second(rt, prompts[:1], new_tokens, thresholds)
    load_start = os.getloadavg()
    tps: list[list[float]] = [[], []]
    for r in tqdm(range(rounds), desc="A/B rounds", unit="round"):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            tps[i].append(tokens_per_second(rts[i], prompts, new_tokens, thresholds))
    ratios = [y / x for x, y in zip(*tps)]
    return {"a": str(a), "b": str(b), "rounds": rounds, "threads": threads, "new_tokens": new_tokens,
            "prompts": len(prompts), "thresholds": thresholds,
            "tokens_per_second": {"a": float(np.median(tps[0])), "b": float(np.median(tps[1]))},
            "spread": {k: float((max(v) - min(v)) / 2 / np.median(v)) for k, v in zip("ab", tps)},
            "b_over_a": float(np.median(ratios)), "b_over_a_ci95": ratio_interval(ratios),
            "passes": {"a": tps[0], "b": tps[1]}, "load_average": {"start": load_start, "end": os.getloadavg()}}


def markdown(res: dict) -> str:
    lo, hi = res["b_over_a_ci95"] or (float("nan"), float("nan"))
    verdict = "within noise" if lo <= 1.0 <= hi else ("B faster" if lo > 1.0 else "B slower")
    return "\n".join([
        f"# A/B: {res['b']} over {res['a']}", "",
        f"{res['rounds']} rounds, order alternating; each pass {res['prompts']} prompts x {res['new_tokens']} greedy "
        f"tokens, thresholds {res['thresholds']}, {res['threads']} thread(s). Load average at start "
        f"{res['load_average']['start'][0]:.2f}, at end {res['load_average']['end'][0]:.2f}.", "",
        "| export | tokens/s (median) | spread (half-range) |", "|---|---:|---:|",
        f"| A: {res['a']} | {res['tokens_per_second']['a']:.1f} | ±{res['spread']['a']:.0%} |",
        f"| B: {res['b']} | {res['tokens_per_second']['b']:.1f} | ±{res['spread']['b']:.0%} |", "",
        f"B / A: **{res['b_over_a']:.3f}** [{lo:.3f}, {hi:.3f}] (median per-round ratio, bootstrap 95%): {verdict}.", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--thresholds", default="never", help="'never' (exits off, default) or a target such as 0.95")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for folder in (a.a, a.b):
        if not (folder / "manifest.json").is_file():
            p.error(f"{folder} is not an export folder (no manifest.json)")
    if a.rounds < 3:
        p.error("--rounds must be at least 3 for an interval")
    thresholds = a.thresholds if a.thresholds == "never" else float(a.thresholds)
    res = compare(a.a, a.b, rounds=a.rounds, threads=a.threads, new_tokens=a.new_tokens, thresholds=thresholds)
    md = markdown(res)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "compare.json").write_text(json.dumps(res, indent=1))
        (a.out / "compare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
