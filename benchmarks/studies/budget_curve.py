"""Agreement vs. average compute on held-out tokens: threshold calibration, EERO budget, oracle.

    python -m benchmarks.studies.budget_curve CHECKPOINT [--out DIR] [--budgets 0.3 0.5 ...] [--targets 0.9 ...]
                                      [--kv-policy fill|defer] [--scores head|gate]

CHECKPOINT holds `calibration_scores.npz` and `heldout_scores.npz` (written by
`ExitScores.save`). Thresholds are always fitted on the calibration scores and measured on the
held-out ones, for three policies:

  threshold  `exporter.calibrate.calibrate_thresholds(cal, target, delta=...)`, one point per
             accuracy target;
  budget     `exporter.budget.budget_thresholds(cal, budget)`, one point per compute budget
             (the JSON and table also give the EERO rates alone, `refine=False`). By default
             the budgets span the feasible range, from the cheapest policy (every token at the
             first exit) to 1 (the chain without early exits, checks included: the full
             model's output); budgets given below the range are skipped with a note;
  oracle     the best any exit rule could do knowing the agreements: within each budget, every
             token leaves at its earliest agreeing exit, the most expensive of those (greedily)
             at the cheapest exit instead; agreement 1 at the plain oracle's compute.

Compute is in the budget's unit: a share of the chain without early exits under the KV policy
(`--kv-policy`, default fill; exporter/budget.py). The report gives the feasible range (also in
multiples of the plain model's compute) and the smallest budget that keeps `--min-agreement` on
held-out tokens; the plot shades what lies outside the range.

Writes budget_curve.json, budget_curve.md and (with matplotlib) budget_curve.png into --out
(default CHECKPOINT/reports/budget). `--scores gate` uses the exit gates' scores instead of the
heads' confidence (exporter/gates.py): the same comparison with checks that cost ~nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from exporter.budget import budget_for_agreement, budget_range, budget_thresholds
from exporter.calibrate import calibrate_thresholds
from exporter.scores import ExitScores, Outcome, oracle, simulate

CALIBRATION_FILE = "calibration_scores.npz"
HELDOUT_FILE = "heldout_scores.npz"
DEFAULT_TARGETS = (0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def budget_oracle(scores: ExitScores, budget: float, kv_policy: str = "fill") -> tuple[float, float, float]:
    """(agreement, compute, layers) of the best exit choice per token with mean compute <= budget
    (compute: share of the chain without early exits under kv_policy, as the budget).

    Keeping a token right costs its earliest agreeing exit; giving up costs the cheapest exit.
    Every kept token is worth the same, so keeping the cheapest-to-keep ones is optimal.
    """
    n = scores.num_tokens
    cost = scores.costs(kv_policy) / scores.costs(kv_policy)[-1]
    ok = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)
    first = ok.argmax(axis=1)  # earliest agreeing exit (E = full model)
    cheap = int(cost.argmin())
    extra = cost[first] - cost[cheap]
    order = np.argsort(extra, kind="stable")
    spent = cost[cheap] * n + np.cumsum(extra[order])
    kept = int(np.searchsorted(spent, budget * n + 1e-9, side="right"))
    exits = np.full(n, cheap)
    exits[order[:kept]] = first[order[:kept]]
    layers = scores.layers(kv_policy)
    return (float(ok[np.arange(n), exits].mean()), float(cost[exits].mean()), float(layers[exits].mean()))


def _point(method: str, setting: dict, held: Outcome, cal: Outcome, chain: tuple[float, float], **extra) -> dict:
    """chain: (held-out, calibration) cost of the chain without early exits, to put compute in budget units."""
    return {"method": method, **setting,
            "agreement": held.agreement, "compute": held.compute / chain[0], "layers": held.layers,
            "calibration_agreement": cal.agreement, "calibration_compute": cal.compute / chain[1],
            "coverage": [round(float(x), 5) for x in held.coverage], **extra}


def default_budgets(cal: ExitScores, kv_policy: str = "fill") -> list[float]:
    """The feasible range: its low end (every token at the first exit, rounded up to 4 places),
    then every tenth above it up to 1 (the chain without early exits)."""
    lo = float(np.ceil(budget_range(cal, kv_policy=kv_policy).cheapest * 1e4) / 1e4)
    return [lo] + [round(b, 1) for b in np.arange(0.1, 1.05, 0.1) if b > lo + 0.02]


def run(cal: ExitScores, held: ExitScores, budgets, targets, *, beta: float, delta: float | None,
        kv_policy: str = "fill", min_agreement: float = 0.5) -> dict:
    rows, notes = [], []
    rng = budget_range(cal, kv_policy=kv_policy)
    chain = (float(held.costs(kv_policy)[-1]), rng.chain_compute)
    budgets = default_budgets(cal, kv_policy) if budgets is None else budgets
    for target in targets:
        th = np.asarray(calibrate_thresholds(cal, target, delta=delta), dtype=np.float64)
        rows.append(_point("threshold", {"target": target}, simulate(held, th, kv_policy), simulate(cal, th, kv_policy),
                           chain, thresholds=th.tolist()))
    for budget in budgets:
        if budget < rng.cheapest - 1e-12:
            notes.append(f"budget {budget} skipped: below the cheapest policy ({rng.cheapest:.4f})")
            continue
        t0 = time.perf_counter()
        res = budget_thresholds(cal, budget, beta=beta, kv_policy=kv_policy)
        seconds = time.perf_counter() - t0
        rows.append(_point("budget", {"budget": budget}, simulate(held, res.thresholds, kv_policy), res.outcome, chain,
                           origin=res.origin, mu=res.mu, fit_seconds=round(seconds, 3),
                           thresholds=res.thresholds.tolist()))
        rates = budget_thresholds(cal, budget, beta=beta, refine=False, kv_policy=kv_policy)
        rows.append(_point("eero-rates-only", {"budget": budget}, simulate(held, rates.thresholds, kv_policy),
                           rates.outcome, chain, mu=rates.mu, eps=rates.eps.tolist(),
                           thresholds=rates.thresholds.tolist()))
        agreement, compute, layers = budget_oracle(held, budget, kv_policy)
        rows.append({"method": "oracle", "budget": budget, "agreement": agreement, "compute": compute,
                     "layers": layers})
    best = oracle(held)
    floor = budget_for_agreement(cal, min_agreement, heldout=held, kv_policy=kv_policy, beta=beta)
    return {
        "calibration": {"tokens": cal.num_tokens, "sequences": int(np.unique(cal.sequence).size)},
        "heldout": {"tokens": held.num_tokens, "sequences": int(np.unique(held.sequence).size)},
        "exit_layers": list(cal.exit_layers), "num_layers": cal.num_layers, "check_cost": cal.check_cost,
        "beta": beta, "delta": delta, "kv_policy": kv_policy,
        "range": {"cheapest": rng.cheapest, "never": rng.never, "chain_compute": rng.chain_compute,
                  "cheapest_compute": rng.cheapest_compute, "describe": rng.describe()},
        "min_agreement": {"floor": min_agreement, "budget": floor},
        "oracle": {"agreement": best.agreement, "compute": float(best.compute / chain[0]), "layers": best.layers},
        "rows": rows, "notes": notes,
    }


LABELS = {"threshold": "threshold calibration", "budget": "budget (EERO + refinement)",
          "eero-rates-only": "budget (EERO rates only)", "oracle": "oracle within budget"}


def markdown(report: dict, checkpoint: str) -> str:
    lines = [f"# Agreement vs. compute on held-out tokens: {checkpoint}", "",
             f"Calibration {report['calibration']['tokens']} tokens ({report['calibration']['sequences']} sequences), "
             f"held-out {report['heldout']['tokens']} tokens ({report['heldout']['sequences']} sequences); "
             f"exits after layers {report['exit_layers']} of {report['num_layers']}, check cost "
             f"{report['check_cost']:g} layers; beta {report['beta']:g}; KV policy {report['kv_policy']}. Oracle "
             f"(every token at its earliest agreeing exit): agreement 1, compute {report['oracle']['compute']:.3f}.", "",
             "Compute is the mean cost per token as a share of the chain without early exits (the plain model "
             "plus every exit check, under the KV policy): the budget's unit, 1 = the full model's output. "
             "Thresholds are fitted on calibration and applied to held-out tokens.", "",
             f"Range: {report['range']['describe']}. Held-out agreement >= {report['min_agreement']['floor']:g} "
             f"needs a budget of about {report['min_agreement']['budget']:.3f} or more (refined EERO fits, bisection; "
             f"`lama calibrate --budget` refuses less, `--min-agreement`).", "",
             "| method | setting | held-out agreement | held-out compute | held-out layers "
             "| calib. agreement | calib. compute |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        setting = f"target {r['target']:g}" if "target" in r else f"budget {r['budget']:g}"
        cal = (f"{r['calibration_agreement']:.4f} | {r['calibration_compute']:.4f}"
               if "calibration_agreement" in r else "- | -")
        lines.append(f"| {LABELS[r['method']]} | {setting} | {r['agreement']:.4f} | {r['compute']:.4f} "
                     f"| {r['layers']:.2f} | {cal} |")
    lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"threshold": "o-", "budget": "s-", "oracle": "^--"}
    for method, style in styles.items():
        rows = [r for r in report["rows"] if r["method"] == method]
        if rows:
            ax.plot([r["compute"] for r in rows], [r["agreement"] for r in rows], style, label=LABELS[method])
    r = report.get("range")
    if r:  # outside the feasible range: no policy there (left), or the exits are off (right)
        ax.axvspan(0, r["cheapest"], color="0.85", zorder=0, label="infeasible (below the cheapest policy)")
        ax.axvline(1.0, color="0.4", lw=0.8, ls=":")
        ax.axvline(r["cheapest"], color="0.4", lw=0.8, ls=":")
        ax.set_xlim(0, 1.05)
    floor = report.get("min_agreement")
    if floor:
        ax.axhline(floor["floor"], color="tab:red", lw=0.8, ls="--", label=f"agreement floor {floor['floor']:g}")
    ax.set_xlabel("average compute (share of the chain without early exits), held-out")
    ax.set_ylabel("agreement with full model, held-out")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help=f"folder with {CALIBRATION_FILE} and {HELDOUT_FILE}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default CHECKPOINT/reports/budget)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="average compute budgets, shares of the chain without early exits (default: the "
                             "feasible range's low end, then every tenth above it up to 1)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS),
                        help="agreement targets for threshold calibration")
    parser.add_argument("--beta", type=float, default=0.04, help="EERO temperature")
    parser.add_argument("--delta", type=float, default=None, help="risk level passed to calibrate_thresholds")
    parser.add_argument("--kv-policy", choices=("fill", "defer"), default="fill",
                        help="KV policy the work is counted for (default fill, where exits save work)")
    parser.add_argument("--min-agreement", type=float, default=0.5,
                        help="report the smallest budget keeping this held-out agreement (default 0.5)")
    parser.add_argument("--scores", choices=("head", "gate"), default="head",
                        help="head: the heads' confidence (each check costs a head); gate: the exit gates' "
                             "scores (*_scores_gate.npz, checks cost a fraction of a layer)")
    args = parser.parse_args(argv)

    files = [name if args.scores == "head" else name.replace(".npz", "_gate.npz")
             for name in (CALIBRATION_FILE, HELDOUT_FILE)]
    for name in files:
        if not (args.checkpoint / name).is_file():
            parser.error(f"{args.checkpoint / name} not found (write it with ExitScores.save"
                         + (", or train with gates" if args.scores == "gate" else "") + ")")
    cal, held = (ExitScores.load(args.checkpoint / name) for name in files)
    if list(cal.exit_layers) != list(held.exit_layers) or cal.num_layers != held.num_layers:
        parser.error("calibration and held-out scores come from different exit layouts")
    out = args.out or args.checkpoint / "reports" / "budget"
    out.mkdir(parents=True, exist_ok=True)

    report = run(cal, held, args.budgets, args.targets, beta=args.beta, delta=args.delta, kv_policy=args.kv_policy,
                 min_agreement=args.min_agreement)
    report["checkpoint"] = str(args.checkpoint)
    report["scores"] = args.scores
    (out / "budget_curve.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "budget_curve.md").write_text(markdown(report, str(args.checkpoint)))
    if not plot(report, out / "budget_curve.png"):
        print("matplotlib not installed: no budget_curve.png", file=sys.stderr)
    print(markdown(report, str(args.checkpoint)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
