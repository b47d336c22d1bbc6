"""Which gate features earn their place? Coverage at 95% precision per exit, by feature set.

    python -m benchmarks.studies.gate_features CHECKPOINT CACHE_DIR [--steps 300] [--sets hidden hidden+move ...]
                                       [--references] [--out DIR]

CHECKPOINT: a `lama train` checkpoint (its heads, and the head agreements stored in
calibration_scores.npz / heldout_scores.npz); CACHE_DIR: the feature cache that run kept
(`api.train(..., cache_dir=...)`: folders calib/ and heldout/). For each feature set, fresh
gates are trained on the calibration tokens (their agreement labels come from the stored
scores: no vocabulary-sized head runs again) and measured on the held-out tokens, per exit:

* AUC: chance that an agreeing token scores above a disagreeing one;
* coverage at 95% precision: the largest share of tokens one threshold on the score can
  send out while >= 95% of them agree (that exit alone, all tokens reaching it);
* oracle coverage: the share whose head agrees (a perfect gate's coverage at precision 1);
* in the chain: thresholds calibrated at 0.95 on the first half of the held-out windows,
  mean layers computed and agreement on the second half.

--references adds rows that are not in the exported graph (gate_references.py): the head's
full-vocabulary softmax, and consistency between consecutive exits' top-1 words, to tell a
weak gate from heads that cannot know. Writes gate_features.json / .md into --out (default CHECKPOINT/reports/gate_features).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import write_report


SETS = (("hidden",), ("hidden", "move"), ("hidden", "shortlist"), ("hidden", "position"),
        ("hidden", "move", "shortlist"), ("hidden", "move", "shortlist", "position"))


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUC with average ranks for ties."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    r = rankdata(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def coverage_at_precision(score: np.ndarray, agree: np.ndarray, precision: float = 0.95) -> float:
    """Largest share of tokens with score >= t whose agreement rate is >= precision."""
    order = np.argsort(-score, kind="stable")
    hits = np.cumsum(agree[order])
    n = np.arange(1, len(score) + 1)
    ok = hits / n >= precision
    # only thresholds between distinct scores are realisable: the last index of each tie group
    last = np.r_[score[order][1:] != score[order][:-1], True]
    ok &= last
    return float(n[ok].max() / len(score)) if ok.any() else 0.0


def main(argv=None) -> int:
    from exporter.backbone import load_backbone
    from exporter.cache import load_features
    from exporter.checkpoint import load_heads, read_config, read_scores
    from exporter.gates import ExitGates, train_gates

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("cache", type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--shortlist", type=int, default=256)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--sets", nargs="+", help="feature sets to compare, e.g. hidden hidden+move (default: all six)")
    p.add_argument("--references", action="store_true",
                   help="add the reference rows of gate_references.py (full-vocabulary head softmax, consistency)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    sets = [tuple(x.split("+")) for x in a.sets] if a.sets else SETS
    cfg = read_config(a.checkpoint)
    bb = load_backbone(cfg.source)
    heads = load_heads(a.checkpoint, bb, cfg)
    cal_f, held_f = load_features(a.cache / "calib"), load_features(a.cache / "heldout")
    cal_s, held_s = read_scores(a.checkpoint, "calibration"), read_scores(a.checkpoint, "heldout")
    if cal_s.num_tokens != cal_f.num_tokens or held_s.num_tokens != held_f.num_tokens:
        raise SystemExit("the cache does not hold the checkpoint's calibration / held-out tokens")
    seqs = np.unique(held_s.sequence)
    first = np.isin(held_s.sequence, seqs[: len(seqs) // 2])
    results, gates = [], None
    for feats in sets:
        t0 = time.perf_counter()
        gates = ExitGates(len(cfg.exits), bb.shape.hidden_size, a.width, feats, min(a.shortlist, bb.shape.vocab_size))
        train_gates(gates, bb, heads, cal_f, cal_s.agree, steps=a.steps, seed=0)
        score = gates.score_features(bb, heads, held_f)
        results.append({"features": list(feats), "macs": gates.macs(), "seconds": time.perf_counter() - t0,
                        **evaluate(score, held_s, cfg.exits, first, a.target)})
    if a.references:  # the last set's gates, with their held-out scores from above
        results += references(a, bb, heads, gates, score, results[-1]["features"], cal_f, held_f, cal_s, held_s, first)
    for r in results:
        print(r["features"], [round(e["coverage_at_95"], 3) for e in r["per_exit"]], round(r["chain"]["layers"], 2))
    res = {"checkpoint": str(a.checkpoint), "calibration_tokens": cal_s.num_tokens,
           "heldout_tokens": held_s.num_tokens, "num_layers": cfg.num_layers, "target": a.target, "sets": results}
    write_report(a.out or a.checkpoint / "reports" / "gate_features", "gate_features", res, markdown(res))
    return 0


def evaluate(score: np.ndarray, held_s, exits: list[int], first: np.ndarray, target: float) -> dict:
    """Per exit AUC / coverage at 95% precision / oracle, and the chain with thresholds fitted on
    the held-out windows in `first`, measured on the others."""
    from exporter.calibrate import calibrate_thresholds
    from exporter.scores import simulate

    per_exit = []
    for k, layer in enumerate(exits):
        ag = held_s.agree[:, k]
        per_exit.append({"exit_layer": layer, "auc": auc(score[:, k], ag),
                         "coverage_at_95": coverage_at_precision(score[:, k], ag, 0.95),
                         "oracle_coverage": float(ag.mean())})
    scored = dataclasses.replace(held_s, confidence=score)
    chain = simulate(scored.subset(~first), calibrate_thresholds(scored.subset(first), target))
    return {"per_exit": per_exit, "chain": {"layers": chain.layers, "agreement": chain.agreement,
                                            "exit_share": float((chain.exit_index < len(exits)).mean())}}


def references(a, bb, heads, gates, gate_held, gate_set, cal_f, held_f, cal_s, held_s, first) -> list[dict]:
    """The reference rows (gate_references.py): none of them is in the exported graph."""
    from benchmarks.studies import gate_references as ref
    from exporter.checkpoint import read_scores
    from exporter.gates import shortlist_ids

    head_held = read_scores(a.checkpoint, "heldout", "head")
    if head_held.num_tokens != held_s.num_tokens:
        raise SystemExit("the checkpoint's head scores do not cover its held-out tokens")
    ids = shortlist_ids(cal_f, min(a.shortlist, bb.shape.vocab_size))
    gate_cal = gates.score_features(bb, heads, cal_f)
    words_cal, words_held = ref.top_words(heads, cal_f, ids), ref.top_words(heads, held_f, ids)
    rows = {"head softmax (reference)": head_held.confidence,
            f"{'+'.join(gate_set)} + consistency (reference)":
                ref.gate_consistency(gate_cal, gate_held, words_cal["shortlist_top1"], words_held["shortlist_top1"],
                                     cal_s.agree),
            "head softmax + consistency (reference)": ref.softmax_consistency(words_cal, words_held, cal_s.agree)}
    return [{"features": [name], "macs": None, "reference": True,
             **evaluate(score, held_s, list(held_s.exit_layers), first, a.target)} for name, score in rows.items()]


def markdown(res: dict) -> str:
    exits = [e["exit_layer"] for e in res["sets"][0]["per_exit"]]
    lines = [f"# Gate features: held-out coverage at 95% precision per exit ({res['heldout_tokens']} held-out tokens, "
             f"gates trained on {res['calibration_tokens']} calibration tokens)", "",
             "Cells: coverage at 95% precision / AUC. Oracle = share of tokens whose head agrees. Chain: thresholds "
             f"at {res['target']} fitted on half the held-out windows, mean layers (of {res['num_layers']}) and "
             "agreement on the other half.", "",
             "| features | " + " | ".join(f"L{e}" for e in exits) + " | chain layers | chain agreement | MACs |",
             "|---|" + "---:|" * (len(exits) + 3)]
    for s in res["sets"]:
        cells = [f"{e['coverage_at_95']:.3f} / {e['auc']:.3f}" if e["auc"] is not None else "-" for e in s["per_exit"]]
        lines.append(f"| {'+'.join(s['features'])} | " + " | ".join(cells)
                     + f" | {s['chain']['layers']:.2f} | {s['chain']['agreement']:.3f} | {s['macs'] or '-'} |")
    lines.append("| oracle | " + " | ".join(f"{e['oracle_coverage']:.3f}" for e in res["sets"][0]["per_exit"])
                 + " | | | |")
    if any(s.get("reference") for s in res["sets"]):
        lines += ["", "Reference rows are not in the exported graph (benchmarks/studies/gate_references.py): the head's own "
                  "top-1 probability over the whole vocabulary (a vocabulary-sized product per check); the last "
                  "gate's logit with whether the shortlist's top-1 equals the previous exit's (logistic fit on the "
                  "calibration tokens); the head's top-1 and top-1 minus top-2 probabilities with whether its "
                  "top-1 equals the previous exit's and for how many exits in a row (same fit). Where they cover "
                  "no more than the gate, the gate is not what limits coverage: the heads' agreement is not "
                  "predictable at 95% precision from these signals."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
