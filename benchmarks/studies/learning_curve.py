"""Where does more training text stop paying? Heads and gates trained on growing subsets.

    python -m benchmarks.studies.learning_curve RECIPE --tokens 40960 163840 655360 [--epochs 2]
        [--cache DIR] [--data PATH ...] [--out DIR]

One frozen pass caches the largest training set (and the recipe's calibration and
held-out text); each smaller size is a random subset of whole windows of it, so every
point sees the same calibration and held-out tokens. Per size: heads trained for
`epochs` passes over the subset (steps = epochs * tokens / batch_tokens), gates on the
recipe's gate_tokens, then, on held-out text:

* per-exit agreement of the head's argmax (full vocabulary) with the full model;
* oracle depth: mean layers when every token leaves at its first agreeing exit;
* calibrated depth: thresholds fitted at the target on the calibration text (recipe's
  confidence: gate or head), mean layers and agreement on the held-out text;
* how often each exit fires at that target (an exit that never fires is pure cost:
  the data for placing exits).

Writes learning_curve.json / .md into --out (default runs/learning_curve/RECIPE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import write_report


def main(argv=None) -> int:
    from exporter import api
    from exporter.backbone import load_backbone
    from exporter.cache import cache_features
    from exporter.calibrate import calibrate_thresholds
    from exporter.checkpoint import score_kind, scores_file
    from exporter.data import default_data_dir, make_splits, read_docs
    from exporter.scores import oracle, simulate
    from exporter.train import check_exits, default_exits, resolve_device, score_split

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--tokens", type=int, nargs="+", default=[40960, 163840, 655360])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--cache", type=Path, help="feature cache folder (kept and reused)")
    p.add_argument("--data", nargs="+")
    p.add_argument("--device")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    recipe = api.resolve_recipe(a.recipe)
    cfg = dataclasses.replace(recipe.train, device=a.device or recipe.train.device)
    device = resolve_device(cfg.device)
    sizes = sorted(a.tokens)
    bb = load_backbone(recipe.source)
    exits = check_exits(recipe.exits or default_exits(bb.shape.num_layers, recipe.exit_every), bb.shape.num_layers)
    splits = make_splits(read_docs(a.data or [default_data_dir()]), bb.tokenizer, cfg.seq_len,
                         {"train": sizes[-1], "calib": cfg.calib_tokens, "heldout": cfg.heldout_tokens}, seed=cfg.seed)
    cache = a.cache or Path("runs") / "learning_curve" / recipe.name / "cache"
    t0 = time.perf_counter()
    train = cache_features(bb, splits["train"], exits, topk=cfg.topk, folder=cache / "train", dtype="float16",
                           keep_final=False, device=device)
    calib = cache_features(bb, splits["calib"], exits, topk=cfg.topk, folder=cache / "calib", dtype="float32",
                           keep_final=False, device=device)
    held = cache_features(bb, splits["heldout"], exits, topk=cfg.topk, folder=cache / "heldout", dtype="float32",
                          keep_final=False, device=device)
    cache_s = time.perf_counter() - t0
    kind = score_kind(recipe.confidence)
    head_conf = "top1" if recipe.confidence == "gate" else recipe.confidence
    points = []
    for n in sizes:
        sub = train if n >= train.num_tokens else train.with_tokens(n, seed=cfg.seed)
        steps = max(50, int(round(a.epochs * sub.num_tokens / cfg.batch_tokens)))
        t1 = time.perf_counter()
        heads, gates, rep, _, _ = api.fit(bb, exits, sub, dataclasses.replace(cfg, steps=steps), device)
        sc = {**score_split(bb, heads, gates, calib, "calibration", head_conf, device),
              **score_split(bb, heads, gates, held, "heldout", head_conf, device)}
        cal_s, held_s = sc[scores_file("calibration", kind)], sc[scores_file("heldout", kind)]
        th = calibrate_thresholds(cal_s, recipe.target)
        out = simulate(held_s, th)
        orc = oracle(held_s)
        points.append({"tokens": sub.num_tokens, "steps": steps, "train_seconds": rep.seconds,
                       "seconds": time.perf_counter() - t1,
                       "agreement": held_s.agree.mean(0).round(4).tolist(),
                       "oracle_layers": orc.layers, "calibrated_layers": out.layers,
                       "calibrated_agreement": out.agreement, "exit_share": out.coverage.round(4).tolist(),
                       "exit_agreement": [None if np.isnan(x) else round(float(x), 4) for x in out.exit_agreement]})
        print(json.dumps(points[-1]), flush=True)
    res = {"recipe": recipe.name, "model": recipe.source.model_id, "exits": exits, "num_layers": bb.shape.num_layers,
           "target": recipe.target, "confidence": recipe.confidence, "epochs": a.epochs,
           "calibration_tokens": calib.num_tokens, "heldout_tokens": held.num_tokens, "domains": list(held.domains),
           "cache_seconds": cache_s, "points": points}
    write_report(a.out or Path("runs") / "learning_curve" / recipe.name, "learning_curve", res, markdown(res))
    return 0


def markdown(res: dict) -> str:
    ex = res["exits"]
    lines = [f"# Learning curve: {res['model']} ({res['confidence']} scores, target {res['target']})", "",
             f"Held-out: {res['heldout_tokens']} tokens, calibration: {res['calibration_tokens']} tokens, domains "
             f"{res['domains']}; heads trained {res['epochs']} epochs over each subset. Depth = mean decoder layers "
             f"per token (of {res['num_layers']}).", "",
             "| train tokens | " + " | ".join(f"agree L{e}" for e in ex)
             + " | oracle depth | calibrated depth | calibrated agreement |", "|---:|" + "---:|" * (len(ex) + 3)]
    for p in res["points"]:
        lines.append(f"| {p['tokens']} | " + " | ".join(f"{x:.3f}" for x in p["agreement"])
                     + f" | {p['oracle_layers']:.2f} | {p['calibrated_layers']:.2f} | {p['calibrated_agreement']:.3f} |")
    lines += ["", "Share of held-out tokens leaving at each exit at the target (largest size):", "",
              "| " + " | ".join(f"L{e}" for e in ex) + " |", "|" + "---:|" * len(ex),
              "| " + " | ".join(f"{x:.3f}" for x in res["points"][-1]["exit_share"]) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
