"""Exits placed by data: drop the checks that (almost) never fire.

Every exit costs a check for every token that reaches it and a segment boundary in the
runtime (an extra graph call). An exit that sends out under `min_share` of the
calibration tokens at the target is pure cost, so after training we drop such exits one
at a time (the least used first) and recalibrate the rest, since removing an exit
changes which tokens reach the later ones. `lama train --exits auto` trains heads at
every other layer and lets this choose; a recipe sets `exit_min_share` to prune its own list;
`lama calibrate --exit-min-share` prunes a trained checkpoint (`prune_checkpoint`).
"""

from __future__ import annotations

import numpy as np

from .calibrate import calibrate_thresholds
from .scores import ExitScores, simulate


def take_exits(scores: ExitScores, keep: list[int]) -> ExitScores:
    """The same tokens with only the exits at indices `keep` (in order)."""
    return ExitScores(scores.confidence[:, keep], scores.agree[:, keep], scores.sequence,
                      [scores.exit_layers[i] for i in keep], scores.num_layers, scores.check_cost,
                      scores.domain, scores.domains)


def prune_exits(scores: ExitScores, target: float, min_share: float, margin: float = 0.0) -> list[int]:
    """Indices of the exits to keep: each sends >= min_share of the calibration tokens out at
    `target` (fitted at target + margin, as the thresholds will be) once the others are
    recalibrated without the dropped ones. At least one stays."""
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"exit_min_share must be in [0, 1), got {min_share}")
    keep = list(range(scores.num_exits))
    while len(keep) > 1:
        sub = take_exits(scores, keep)
        share = simulate(sub, calibrate_thresholds(sub, target, margin=margin)).coverage
        worst = int(np.argmin(share))
        if share[worst] >= min_share:
            break
        keep.pop(worst)
    return keep


def keep_heads(heads, keep: list[int]) -> None:
    """Drop the heads of pruned exits in place."""
    from torch import nn

    heads.heads = nn.ModuleList(heads.heads[i] for i in keep)
    heads.exits = [heads.exits[i] for i in keep]


def keep_gates(gates, keep: list[int]) -> None:
    """Drop the gates (and their per-exit buffers) of pruned exits in place."""
    from torch import nn

    gates.gates = nn.ModuleList(gates.gates[i] for i in keep)
    for name in ("scalar_mean", "scalar_std", "short_w", "short_b"):
        setattr(gates, name, getattr(gates, name)[keep].clone())


def prune_checkpoint(checkpoint, min_share: float, target: float, margin: float = 0.0, backbone=None,
                     device: str = "cpu"):
    """Drop a trained checkpoint's exits that send out < `min_share` of the calibration tokens
    at `target` (+ margin), in place: heads and gates keep only the exits that stay, and the
    gates are trained again (on `gate_tokens` of the training windows, one frozen pass over
    them) and the calibration and held-out scores computed again on the same windows, because a
    gate's `move` feature reads the previous exit's state, which pruning changes. The caller
    recalibrates. `device`: where the model runs for the new gates and scores. Returns (the
    reopened Checkpoint, kept layers)."""
    import dataclasses

    from .backbone import load_backbone
    from .cache import cache_features
    from .checkpoint import GATES, Checkpoint, save_checkpoint
    from .gate_fitting import refit_gates
    from .recipes import TrainConfig
    from .train import score_split

    ck = Checkpoint.open(checkpoint)
    config = ck.config
    keep = prune_exits(ck.scores("calibration"), target, min_share, margin)
    if len(keep) == len(config.exits):
        return ck, list(config.exits)
    bb = backbone or load_backbone(config.source)
    heads = ck.heads(bb)
    gates = ck.gates(bb) if config.confidence == "gate" or (ck.path / GATES).is_file() else None
    keep_heads(heads, keep)
    if gates is not None:
        keep_gates(gates, keep)
    dropped = [e for i, e in enumerate(config.exits) if i not in keep]
    config.exits = [config.exits[i] for i in keep]
    splits = ck.splits(bb.tokenizer)  # the windows `lama train` drew
    cfg = config.train["config"]
    if gates is not None and splits["train"].num_tokens:  # as `lama train` trained them, for the kept exits
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        tc = dataclasses.replace(TrainConfig(**{k: v for k, v in cfg.items() if k in fields}), gates=True,
                                 gate_width=config.gate_width, gate_features=list(config.gate_features),
                                 gate_shortlist=config.gate_shortlist)
        gates = refit_gates(bb, heads, tc, device, windows=splits["train"])
    scores = {}
    for split, name in (("calib", "calibration"), ("heldout", "heldout")):
        f = cache_features(bb, splits[split], config.exits, topk=cfg.get("topk", 64), keep_final=False,
                           device=device, desc=f"scoring {split} again")
        scores.update(score_split(bb, heads, gates, f, name, config.head_confidence, device))
    config.thresholds = [config.thresholds[i] for i in keep] if config.thresholds else config.thresholds
    config.train = {**(config.train or {}), "exit_min_share": min_share,
                    "pruned_exits": sorted(set((config.train or {}).get("pruned_exits", [])) | set(dropped)),
                    "gates_retrained_after_pruning": gates is not None and bool(splits["train"].num_tokens)}
    save_checkpoint(ck.path, config, heads, scores, gates, keep_others=True)  # reports/ and the like stay
    return Checkpoint.open(ck.path), list(config.exits)
