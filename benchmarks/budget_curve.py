"""Agreement vs. average compute on held-out tokens: threshold calibration, EERO budget, oracle.

    python benchmarks/budget_curve.py CHECKPOINT [--out DIR] [--budgets 0.3 0.5 ...] [--targets 0.9 ...]

CHECKPOINT holds `calibration_scores.npz` and `heldout_scores.npz` (written by
`ExitScores.save`). Thresholds are always fitted on the calibration scores and measured on the
held-out ones, for three policies:

  threshold  `exporter.calibrate.calibrate_thresholds(cal, target, delta=...)`, one point per
             accuracy target (skipped with a note when that module is not importable);
  budget     `exporter.budget.budget_thresholds(cal, budget)`, one point per compute budget
             (the JSON and table also give the EERO rates alone, `refine=False`);
  oracle     the best any exit rule could do knowing the agreements: within each budget, every
             token leaves at its earliest agreeing exit, the most expensive of those (greedily)
             at the cheapest exit instead; agreement 1 at the plain oracle's compute.

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

try:
    import exporter  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.budget import budget_thresholds  # noqa: E402
from exporter.scores import ExitScores, Outcome, oracle, simulate  # noqa: E402

CALIBRATION_FILE = "calibration_scores.npz"
HELDOUT_FILE = "heldout_scores.npz"
DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_TARGETS = (0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def budget_oracle(scores: ExitScores, budget: float) -> tuple[float, float, float]:
    """(agreement, compute, layers) of the best exit choice per token with mean compute <= budget.

    Keeping a token right costs its earliest agreeing exit; giving up costs the cheapest exit.
    Every kept token is worth the same, so keeping the cheapest-to-keep ones is optimal.
    """
    n = scores.num_tokens
    cost = scores.costs()
    ok = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)
    first = ok.argmax(axis=1)  # earliest agreeing exit (E = full model)
    cheap = int(cost.argmin())
    extra = cost[first] - cost[cheap]
    order = np.argsort(extra, kind="stable")
    spent = cost[cheap] * n + np.cumsum(extra[order])
    kept = int(np.searchsorted(spent, budget * n + 1e-9, side="right"))
    exits = np.full(n, cheap)
    exits[order[:kept]] = first[order[:kept]]
    layers = np.asarray(list(scores.exit_layers) + [scores.num_layers], dtype=np.float64)
    return (float(ok[np.arange(n), exits].mean()), float(cost[exits].mean()), float(layers[exits].mean()))


def _point(method: str, setting: dict, held: Outcome, cal: Outcome, **extra) -> dict:
    return {"method": method, **setting,
            "agreement": held.agreement, "compute": held.compute, "layers": held.layers,
            "calibration_agreement": cal.agreement, "calibration_compute": cal.compute,
            "coverage": [round(float(x), 5) for x in held.coverage], **extra}


def run(cal: ExitScores, held: ExitScores, budgets, targets, *, beta: float, delta: float | None) -> dict:
    rows, notes = [], []
    cheapest = float(cal.costs().min())
    try:
        from exporter.calibrate import calibrate_thresholds
    except ImportError as err:
        calibrate_thresholds = None
        notes.append(f"threshold calibration skipped: exporter.calibrate not importable ({err})")
    if calibrate_thresholds is not None:
        for target in targets:
            th = np.asarray(calibrate_thresholds(cal, target, delta=delta), dtype=np.float64)
            rows.append(_point("threshold", {"target": target}, simulate(held, th), simulate(cal, th),
                               thresholds=th.tolist()))
    for budget in budgets:
        if budget < cheapest:
            notes.append(f"budget {budget} skipped: below the cheapest policy ({cheapest:.4f})")
            continue
        t0 = time.perf_counter()
        res = budget_thresholds(cal, budget, beta=beta)
        seconds = time.perf_counter() - t0
        rows.append(_point("budget", {"budget": budget}, simulate(held, res.thresholds), res.outcome,
                           origin=res.origin, mu=res.mu, fit_seconds=round(seconds, 3),
                           thresholds=res.thresholds.tolist()))
        rates = budget_thresholds(cal, budget, beta=beta, refine=False)
        rows.append(_point("eero-rates-only", {"budget": budget}, simulate(held, rates.thresholds), rates.outcome,
                           mu=rates.mu, eps=rates.eps.tolist(), thresholds=rates.thresholds.tolist()))
        agreement, compute, layers = budget_oracle(held, budget)
        rows.append({"method": "oracle", "budget": budget, "agreement": agreement, "compute": compute,
                     "layers": layers})
    best = oracle(held)
    return {
        "calibration": {"tokens": cal.num_tokens, "sequences": int(np.unique(cal.sequence).size)},
        "heldout": {"tokens": held.num_tokens, "sequences": int(np.unique(held.sequence).size)},
        "exit_layers": list(cal.exit_layers), "num_layers": cal.num_layers, "check_cost": cal.check_cost,
        "beta": beta, "delta": delta,
        "oracle": {"agreement": best.agreement, "compute": best.compute, "layers": best.layers},
        "rows": rows, "notes": notes,
    }


LABELS = {"threshold": "threshold calibration", "budget": "budget (EERO + refinement)",
          "eero-rates-only": "budget (EERO rates only)", "oracle": "oracle within budget"}


def markdown(report: dict, checkpoint: str) -> str:
    lines = [f"# Agreement vs. compute on held-out tokens: {checkpoint}", "",
             f"Calibration {report['calibration']['tokens']} tokens ({report['calibration']['sequences']} sequences), "
             f"held-out {report['heldout']['tokens']} tokens ({report['heldout']['sequences']} sequences); "
             f"exits after layers {report['exit_layers']} of {report['num_layers']}, check cost "
             f"{report['check_cost']:g} layers; beta {report['beta']:g}. Oracle (every token at its earliest "
             f"agreeing exit): agreement 1, compute {report['oracle']['compute']:.3f}.", "",
             "Compute is the mean cost per token as a fraction of the full model; thresholds are fitted on "
             "calibration and applied to held-out tokens.", "",
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
    ax.set_xlabel("average compute (fraction of full model), held-out")
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
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="average compute budgets, fractions of the full model")
    parser.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS),
                        help="agreement targets for threshold calibration")
    parser.add_argument("--beta", type=float, default=0.04, help="EERO temperature")
    parser.add_argument("--delta", type=float, default=None, help="risk level passed to calibrate_thresholds")
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

    report = run(cal, held, args.budgets, args.targets, beta=args.beta, delta=args.delta)
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
