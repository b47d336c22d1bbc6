"""Does the calibration promise hold on text it never saw? Per-domain table, one domain left out.

    python -m benchmarks.studies.domains CHECKPOINT [--target 0.95] [--margin 0.02] [--scores gate|head] [--out DIR]

CHECKPOINT's stored scores carry each token's domain (data.py draws windows evenly from the
folders of ../shared/data: gutenberg = fiction, nonfiction, encyclopedic, dialogue, code,
tinyshakespeare = drama). For each domain D in turn, thresholds are fitted on the calibration
tokens of every *other* domain (D is left out of calibration entirely), then applied to the
held-out tokens of each domain. Reported per held-out domain and per exit: the share of
tokens that leave there and the agreement of those tokens with the full model, with a 95%
Clopper-Pearson interval; "holds" means the interval's upper end reaches the target (the
agreement is at the target within binomial error). A row "all" calibrates on every domain.

Caveat: heads and gates were trained on all domains; only the calibration leaves D out.
Writes domains.json and domains.md into --out (default CHECKPOINT/reports/domains).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import beta

from exporter.calibrate import calibrate_thresholds
from exporter.checkpoint import read_scores
from benchmarks.report import write_report
from exporter.scores import ExitScores, simulate


def interval(k: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Clopper-Pearson interval for k successes in n trials (None when n = 0)."""
    if n == 0:
        return None, None
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


@dataclass
class Cell:
    """Tokens leaving at one exit (or at any exit: exit_layer None) on one held-out domain."""

    exit_layer: int | None
    tokens: int  # held-out tokens of the domain
    exited: int  # of which left here
    share: float
    agreement: float | None
    low: float | None
    high: float | None
    holds: bool  # agreement reaches the target within binomial error (or nothing exited)


def cells(scores: ExitScores, thresholds: list[float], target: float) -> list[Cell]:
    out = simulate(scores, thresholds)
    n, e = scores.num_tokens, scores.num_exits
    ok = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)[np.arange(n), out.exit_index]
    rows = []
    for k in list(range(e)) + [None]:
        m = out.exit_index < e if k is None else out.exit_index == k
        kk, nn = int(ok[m].sum()), int(m.sum())
        lo, hi = interval(kk, nn)
        rows.append(Cell(None if k is None else scores.exit_layers[k], n, nn, nn / max(n, 1),
                         kk / nn if nn else None, lo, hi, nn == 0 or hi >= target))
    return rows


def run(checkpoint: Path, target: float, kind: str, margin: float = 0.0) -> dict:
    calib = read_scores(checkpoint, "calibration", kind)
    held = read_scores(checkpoint, "heldout", kind)
    if calib.domain is None or held.domain is None:
        raise SystemExit(f"{checkpoint}: the stored scores carry no domain labels; retrain with this version")
    domains = list(held.domains)
    result = {"checkpoint": str(checkpoint), "target": target, "margin": margin, "scores": kind, "domains": domains,
              "runs": []}
    for left_out in ["(none)"] + domains:
        keep = np.ones(calib.num_tokens, dtype=bool) if left_out == "(none)" else ~calib.domain_mask(left_out)
        th = calibrate_thresholds(calib.subset(keep), min(1.0, target + margin))
        per = {d: [asdict(c) for c in cells(held.subset(held.domain_mask(d)), th, target)] for d in domains}
        per["all"] = [asdict(c) for c in cells(held, th, target)]
        result["runs"].append({"left_out": left_out, "calibration_tokens": int(keep.sum()),
                               "thresholds": [None if not np.isfinite(t) else float(t) for t in th],
                               "heldout": per})
    return result


def _fmt(c: dict) -> str:
    if not c["exited"]:
        return "0%"
    return f"{c['share']:.1%}: {c['agreement']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" + ("" if c["holds"] else " ✗")


def markdown(res: dict) -> str:
    lines = [f"# Per-domain held-out results, target {res['target']} ({res['scores']} scores"
             + (f", calibrated at target + {res['margin']}" if res.get("margin") else "") + ")", "",
             "Thresholds fitted on the calibration text of every domain except the one left out; "
             "cells: share of held-out tokens leaving (at that exit / at any exit) and their agreement with "
             "the full model, [95% Clopper-Pearson interval]; ✗ = the interval lies below the target.", ""]
    # summary: any exit, per held-out domain (rows) x left-out domain (columns)
    heads = [r["left_out"] for r in res["runs"]]
    lines += ["## Any exit: rows = held-out domain, columns = domain left out of calibration", "",
              "| held-out \\ left out | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for d in res["domains"] + ["all"]:
        lines.append(f"| {d} | " + " | ".join(_fmt(r["heldout"][d][-1]) for r in res["runs"]) + " |")
    lines += ["", "## Per exit, each domain when it is the one left out", ""]
    exits = [c["exit_layer"] for c in res["runs"][0]["heldout"]["all"][:-1]]
    lines += ["| left out = held-out domain | " + " | ".join(f"L{e}" for e in exits) + " | any |",
              "|---|" + "---:|" * (len(exits) + 1)]
    for r in res["runs"][1:]:
        lines.append(f"| {r['left_out']} | " + " | ".join(_fmt(c) for c in r["heldout"][r["left_out"]]) + " |")
    r0 = res["runs"][0]
    lines.append(f"| (none left out), all domains | " + " | ".join(_fmt(c) for c in r0["heldout"]["all"]) + " |")
    fails = [(r["left_out"], d) for r in res["runs"] for d in res["domains"] + ["all"]
             if not all(c["holds"] for c in r["heldout"][d])]
    lines += ["", f"Cells (left out, held-out domain) where some exit misses the target beyond binomial error: "
              f"{len(fails)}" + (f": {fails}" if fails else ".")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--scores", choices=["gate", "head"], default="gate")
    p.add_argument("--margin", type=float, default=0.0,
                   help="calibrate at target + margin (a conservative margin), judge at the target")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = run(a.checkpoint, a.target, a.scores, a.margin)
    write_report(a.out or a.checkpoint / "reports" / "domains", "domains", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
