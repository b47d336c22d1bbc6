"""Does relaxed mode's online check keep exited tokens at the target on a domain calibration never saw?

    python -m benchmarks.studies.online_check EXPORT CHECKPOINT [--target T] [--per-domain 8]
        [--new-tokens 64] [--min-checked 16] [--out DIR]

For each shared domain D in turn, thresholds are fitted on CHECKPOINT's calibration scores of
every other domain (D left out, as benchmarks/studies/domains.py does, at the recipe's margin),
and the export generates, greedily and in relaxed mode (KV policy defer), continuations of
held-out prompts of D, twice: with the online check off and on (runtime/online.py). With the
check off its counter still runs, only never acts: the exited tokens' agreement with the full
model is what the runtime learns as the deferred layers catch up, in both runs. Prompts of one
domain run in sequence as one session: the check's counts and any thresholds it tightened carry
from one prompt to the next, as in a long-running service. Reported per domain: exited tokens,
their realized agreement with a 95% Clopper-Pearson interval, the thresholds' changes, and the
work that ran (layer-positions against the plain model's), for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report


def run_domain(rt, prompts, thresholds: list[float], target: float, new_tokens: int, act: bool,
               min_checked: int) -> dict:
    from runtime.online import OnlineCheck

    check = OnlineCheck.for_manifest(rt.manifest, list(thresholds), target,
                                     min_checked=min_checked if act else 10**12)
    th = list(thresholds)
    exited = tokens = run = plain = 0
    for p in prompts:
        before = len(check.changes)
        res = rt.generate(p, new_tokens, thresholds=[None if t == float("inf") else t for t in th],
                          online_check=check, stop_at_eos=False)
        for ch in check.changes[before:]:  # carry what the check tightened into the next prompt
            th[ch["exit"]] = float("inf") if ch["threshold"] is None else ch["threshold"]
        tokens += len(res.records)
        exited += sum(r.exit_layer < res.num_layers for r in res.records)
        w = res.work()
        run, plain = run + w["layer_positions"], plain + w["plain_layer_positions"]
    rep = check.report()
    checked = sum(e["checked"] for e in rep["exits"])
    agreed = sum(e["agreed"] for e in rep["exits"])
    from benchmarks.studies.domains import interval

    lo, hi = interval(agreed, checked)
    return {"tokens": tokens, "exited": exited, "checked": checked, "agreed": agreed,
            "agreement": agreed / checked if checked else None, "interval": [lo, hi],
            "changes": rep["changes"], "final_thresholds": [None if t == float("inf") else t for t in th],
            "work_share": run / plain if plain else None}


def main(argv=None) -> int:
    from exporter.calibrate import calibrate_thresholds
    from exporter.checkpoint import read_scores
    from exporter.data import default_data_dir, heldout_prompts
    from runtime import Runtime
    from runtime.policy import Policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--target", type=float)
    ap.add_argument("--margin", type=float)
    ap.add_argument("--fit-target", type=float, help="fit the thresholds at this target instead (e.g. looser than "
                    "--target: thresholds that fall short, to see the check act)")
    ap.add_argument("--per-domain", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-checked", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rt = Runtime.load(a.export, threads=a.threads, kv_policy="defer")
    policy = Policy.from_dict(rt.manifest.calibration.policy)
    target = a.target if a.target is not None else float(policy.target or 0.95)
    margin = a.margin if a.margin is not None else float(policy.margin)
    kind = "gate" if rt.manifest.exits and rt.manifest.exits[0].confidence == "gate" else "head"
    calib = read_scores(a.checkpoint, "calibration", kind=kind)
    if calib.domain is None:
        raise SystemExit(f"{a.checkpoint}: its calibration scores carry no domain labels")
    prompts = heldout_prompts(a.export, [default_data_dir()], a.per_domain, a.prompt_tokens)
    res = {"command": command_line("benchmarks.studies.online_check", argv), "export": str(a.export),
           "target": target, "fit_target": a.fit_target, "margin": margin, "scores": kind, "new_tokens": a.new_tokens,
           "per_domain": a.per_domain, "min_checked": a.min_checked, "load_average": list(os.getloadavg()),
           "domains": {}}
    for dom, ps in prompts.items():
        if dom not in calib.domains:
            continue
        fit = target if a.fit_target is None else a.fit_target
        th = calibrate_thresholds(calib.subset(~calib.domain_mask(dom)), fit, margin=margin)
        if len(th) != len(rt.manifest.exits):
            raise SystemExit(f"{len(th)} calibrated exits in the checkpoint, {len(rt.manifest.exits)} in the export")
        res["domains"][dom] = {"thresholds": [None if t == float("inf") else t for t in th],
                               "off": run_domain(rt, ps, th, target, a.new_tokens, False, a.min_checked),
                               "on": run_domain(rt, ps, th, target, a.new_tokens, True, a.min_checked)}
        print(dom, json.dumps({k: res["domains"][dom][k]["agreement"] for k in ("off", "on")}), flush=True)

    def cell(r):
        if not r["checked"]:
            return f"{r['exited']} exited, none checked"
        lo, hi = r["interval"]
        return f"{r['agreement']:.3f} [{lo:.3f}, {hi:.3f}] of {r['checked']} ({r['exited']}/{r['tokens']} exited)"

    fitted = f"fitted at {a.fit_target} + {margin}" if a.fit_target is not None else f"fitted at +{margin}"
    md = [f"# Online check on domains left out of calibration: target {target} (thresholds {fitted})", "",
          f"`{res['command']}`", "",
          f"Greedy relaxed mode (defer), {a.per_domain} held-out prompts x {a.new_tokens} new tokens per domain, "
          f"thresholds fitted without that domain; the check acts after {a.min_checked} checked tokens below "
          f"target - 0.02. Agreement: exited tokens that equal the full model's, 95% Clopper-Pearson interval.", "",
          "| left-out domain | check off: agreement | check on: agreement | thresholds tightened (on) | work, off / on |",
          "|---|---|---|---:|---|"]
    for dom, r in res["domains"].items():
        md.append(f"| {dom} | {cell(r['off'])} | {cell(r['on'])} | {len(r['on']['changes'])} | "
                  f"{r['off']['work_share']:.3f} / {r['on']['work_share']:.3f} |")
    write_report(a.out, "online_check", res, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
