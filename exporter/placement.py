"""Exits placed by data: drop the checks that (almost) never fire.

Every exit costs a check for every token that reaches it and a segment boundary in the
runtime (an extra graph call). An exit that sends out under `min_share` of the
calibration tokens at the target is pure cost, so after training we drop such exits one
at a time (the least used first) and recalibrate the rest, since removing an exit
changes which tokens reach the later ones. `lama train --exits auto` trains heads at
every other layer and lets this choose; a recipe sets `exit_min_share` to prune its own list.
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


def prune_exits(scores: ExitScores, target: float, min_share: float) -> list[int]:
    """Indices of the exits to keep: each sends >= min_share of the calibration tokens out at
    `target` once the others are recalibrated without the dropped ones. At least one stays."""
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"exit_min_share must be in [0, 1), got {min_share}")
    keep = list(range(scores.num_exits))
    while len(keep) > 1:
        sub = take_exits(scores, keep)
        share = simulate(sub, calibrate_thresholds(sub, target)).coverage
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
