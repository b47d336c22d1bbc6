"""Per-exit thresholds that meet an agreement target (the LAMA calibration).

Exits are calibrated in order, each on the calibration tokens that reach it (those no
earlier exit took), exactly the rule the runtime applies. For exit k we sort those tokens
by confidence and take the *lowest* threshold t such that the tokens with confidence >= t
agree with the full model's argmax at >= target. Every exit's leavers then agree at
>= target, and the tokens that run the whole model agree by definition, so the overall
agreement on the calibration set is >= target too.

Guarantee mode (`delta`, exporter/guarantee.py): Learn-then-Test over one threshold shared
by all exits, with text windows (not tokens) as the unit: with probability >= 1 - delta
over the calibration windows, every exit's leavers agree at >= target on new text. The
exact statement and its assumptions are in that module's docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .guarantee import guarantee_thresholds
from .scores import NEVER, ExitScores, NonFiniteError, simulate


def check_target(target: float, delta: float | None = None, margin: float = 0.0) -> None:
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    if not (0.0 <= margin < 1.0):
        raise ValueError(f"calibration margin must be in [0, 1), got {margin}")
    if delta is not None and not (0.0 < delta < 1.0):
        raise ValueError(f"delta (the guarantee's failure probability) must be in (0, 1), got {delta}")


def _exit_threshold(conf: np.ndarray, agree: np.ndarray, target: float) -> float:
    if conf.size == 0:
        return NEVER
    cand = np.unique(conf)[::-1]  # strictest first
    order = np.argsort(-conf, kind="stable")
    cum_ok = np.cumsum(agree[order])
    # number of tokens with conf >= c, for each candidate c
    counts = np.searchsorted(-conf[order], -cand, side="right")
    ok = cum_ok[counts - 1] / counts >= target
    if not ok.any():
        return NEVER
    return float(cand[np.flatnonzero(ok)[-1]])  # loosest threshold that still meets the target


def calibrate_thresholds(scores: ExitScores, target: float, *, delta: float | None = None,
                         margin: float = 0.0) -> list[float]:
    """One threshold per non-final exit; `NEVER` (inf) where no threshold meets the target.

    Without delta: the plain LAMA rule on the calibration tokens (no statement about new
    text), fitted at `target + margin`: the loosest threshold that just reaches the target on
    the calibration tokens falls short of it on new text (SmolLM2, 24k calibration tokens:
    0.939 on held-out text at target 0.95; a margin of 0.03 held on every domain, including
    one left out of calibration: benchmarks/results/smollm2-135m/domains). With delta:
    exporter/guarantee.py's procedure and its stated guarantee (the margin is not used).
    """
    check_target(target, delta, margin)
    if delta is not None:
        return check_thresholds(guarantee_thresholds(scores, target, delta), scores.exit_layers)
    target = min(1.0, target + margin)
    remaining = np.ones(scores.num_tokens, dtype=bool)
    thresholds: list[float] = []
    for k in range(scores.num_exits):
        conf, agree = scores.confidence[remaining, k], scores.agree[remaining, k]
        t = _exit_threshold(conf, agree, target)
        thresholds.append(t)
        remaining &= ~(scores.confidence[:, k] >= t)
    return check_thresholds(thresholds, scores.exit_layers)


def check_thresholds(thresholds: list[float], exit_layers: list[int]) -> list[float]:
    """`thresholds`, unless one is NaN or -inf (+inf = NEVER, the exit is off): NonFiniteError.
    ExitScores already refuses non-finite confidences; this guards what is derived from them."""
    for layer, t in zip(exit_layers, thresholds):
        if np.isnan(t) or t == -np.inf:
            raise NonFiniteError(f"exit after layer {layer}: calibrated threshold {t} (only finite values or "
                                 "+inf for 'never' are valid); no thresholds written")
    return thresholds


@dataclass
class ExitReport:
    exit_layer: int
    threshold: float
    coverage: float  # share of all tokens that leave here
    agreement: float | None  # agreement with the full model among those tokens


@dataclass
class CalibrationReport:
    """What a threshold vector does on one set of tokens (calibration or held-out)."""

    split: str
    target: float | None
    delta: float | None
    tokens: int
    exits: list[ExitReport]
    agreement: float  # over all tokens, including those that ran the full model
    layers_fraction: float  # expected work per token under kv_policy, a share of the plain model's layer-positions
    compute_fraction: float  # same, counting exit checks (ExitScores.costs)
    kv_policy: str = "fill"  # the KV policy the work above is counted for (older reports: fill)
    decided_fraction: float | None = None  # mean depth at which tokens were decided, a share of the layers
    notes: list[str] = field(default_factory=list)  # e.g. a budget's feasible range, the check chosen
    budget: float | None = None  # a budget calibration's budget (share of the chain without early exits)
    chain_fraction: float = 1.0  # the chain without early exits under kv_policy, in the plain model's compute

    @property
    def compute_saved(self) -> float:
        return 1.0 - self.compute_fraction

    def to_dict(self) -> dict:
        d = asdict(self)
        for e in d["exits"]:
            e["threshold"] = None if not np.isfinite(e["threshold"]) else e["threshold"]
        return d

    def table(self) -> str:
        policy = (f"budget {self.budget:g} ({self.compute_fraction / self.chain_fraction:.3f} spent, shares of the "
                  "chain without early exits)") if self.budget is not None else f"target {self.target}"
        lines = [f"{self.split}: {self.tokens} tokens, {policy}" + (f", guarantee delta {self.delta}" if self.delta else ""),
                 "| exit after layer | threshold | coverage | agreement |", "|---:|---:|---:|---:|"]
        for e in self.exits:
            t = "never" if not np.isfinite(e.threshold) else f"{e.threshold:.4f}"
            a = "-" if e.agreement is None else f"{e.agreement:.3f}"
            lines.append(f"| {e.exit_layer} | {t} | {e.coverage:.3f} | {a} |")
        line = f"overall agreement {self.agreement:.4f}; "
        if self.decided_fraction is not None:
            line += f"decided at {self.decided_fraction:.3f} of the layers; "
        line += (f"work under the {self.kv_policy} KV policy {self.layers_fraction:.3f} of the full model's "
                 f"(saved {1 - self.layers_fraction:.1%}), {self.compute_fraction:.3f} with the exit checks")
        if self.kv_policy == "defer":
            line += " (skipped layers run later: exits save calls and latency, not work)"
        lines.append(line)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def report(scores: ExitScores, thresholds: list[float], split: str, target: float | None = None,
           delta: float | None = None, kv_policy: str = "fill") -> CalibrationReport:
    """What `thresholds` do on `scores`, with work counted under `kv_policy` (scores.simulate):
    under `defer` the work stays at the full model's whatever the exits do."""
    out = simulate(scores, thresholds, kv_policy)
    decided = simulate(scores, thresholds).layers if kv_policy != "fill" else out.layers
    exits = [ExitReport(layer, float(t), float(c), None if np.isnan(a) else float(a))
             for layer, t, c, a in zip(scores.exit_layers, thresholds, out.coverage, out.exit_agreement)]
    return CalibrationReport(split, target, delta, scores.num_tokens, exits, out.agreement,
                             out.layers / scores.num_layers, out.compute, kv_policy, decided / scores.num_layers,
                             chain_fraction=float(scores.costs(kv_policy)[-1]))
