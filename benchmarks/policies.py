"""The exit policies the benchmark times: the chain with exits off (row c), the export's
calibrated agreement targets and EERO compute budgets (rows d), each under the KV policies
asked for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from runtime.manifest import to_json_thresholds


@dataclass
class Policy:
    key: str  # row id, e.g. "d: target 0.9"
    kind: str  # "full" | "target" | "budget"
    value: float | None
    thresholds: list[float]  # per exit, inf = never: what the teacher-forced evaluation applies
    runtime: object  # what the worker passes as Runtime.generate(thresholds=...)
    kv: str = "defer"  # "defer", "fill" or "exact" (defer + verification)


def exit_policies(export_dir: Path, targets: list[float], budgets: list[float], calib, budget_unit: str = "compute"
                  ) -> tuple[list[Policy], list[tuple[str, str]]]:
    from runtime.manifest import Manifest, ManifestError, from_json_thresholds

    manifest = Manifest.load(export_dir)
    n = len(manifest.exits)
    inf = float("inf")
    policies = [Policy("c: chain, exits off", "full", None, [inf] * n, "never")]
    skipped: list[tuple[str, str]] = []
    for t in targets:
        try:
            th = from_json_thresholds(manifest.thresholds_for(t))
            policies.append(Policy(f"d: target {t:g}", "target", t, th, t))
        except ManifestError as e:
            skipped.append((f"d: target {t:g}", str(e)))
    name = "d: budget {:g}" + (" layers" if budget_unit == "layers" else "")
    if budgets:
        try:
            from exporter.budget import budget_thresholds
        except ImportError as e:
            reason = f"exporter.budget.budget_thresholds is not importable here ({e})"
            skipped += [(name.format(b), reason) for b in budgets]
        else:
            for b in budgets:  # EERO on the calibration scores; a per-exit list needs no re-export
                try:
                    th = [float(x) for x in budget_thresholds(calib, b, unit=budget_unit).thresholds]
                except ValueError as e:
                    skipped.append((name.format(b), str(e)))
                    continue
                policies.append(Policy(name.format(b), "budget", b, th, to_json_thresholds(th)))
    return policies, skipped


def with_kv_policies(policies: list[Policy], kvs: list[str]) -> list[Policy]:
    """Each exit policy under each KV policy; the first KV policy keeps the plain row name.
    Row c (exits off) runs once: every KV policy is the full model there."""
    out = []
    for p in policies:
        for i, kv in enumerate(kvs if p.kind != "full" else kvs[:1]):
            out.append(replace(p, kv=kv, key=p.key if i == 0 and kv == "defer" else f"{p.key} [{kv}]"))
    return out
