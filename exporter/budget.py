"""Budgeted exit policy after EERO: exit thresholds that hold an average compute budget.

Threshold calibration (`calibrate.py`) asks "how early can tokens leave while agreement with
the full model stays >= target?". This module asks the dual question: "given an average
compute budget B, which thresholds give the most agreement?". It follows

    F. Valade, M. Hebiri, P. Gay. "EERO: Early Exit with Reject Option for Efficient
    Classification with limited budget." UAI 2025, PMLR 286:4290-4308 (arXiv:2402.03779).

EERO treats every exit as a classifier with a reject option: head l either answers or passes
the token on. Notation, with heads l = 0..E-1 and l = E the full model:

    B_l   cost of leaving at l, a fraction of the full model (`ExitScores.costs()`; B_E = 1
          plus the exit checks)
    R_l   Bayesian risk of head l: its disagreement with the full model on the calibration
          tokens (R_E = 0, the full model agrees with itself)
    pi_l  prior over heads, pi_l ∝ 1 / B_l
    eps_l share of all tokens that leave at head l (sum_l eps_l = 1)

1. Rates by exponential weights (the Gibbs solution of min_eps sum_l eps_l (R_l + mu B_l)
   + beta KL(eps || pi)):

       eps_l(mu) = pi_l exp(-(R_l + mu B_l) / beta) / Z(mu),        beta = 0.04 by default.

2. mu >= 0 is the price of compute. The planned cost sum_l eps_l(mu) B_l falls as mu grows,
   so a 1-D bisection finds the smallest mu with sum_l eps_l B_l <= B (mu = 0 when the
   budget does not bind).

3. Reject option from an unlabeled empirical CDF: among the calibration tokens that reach head
   l (not taken by heads < l), head l answers when F_l(score) >= 1 - q_l with the conditional
   rate q_l = (eps_0 + ... + eps_l - share already gone) / share reaching l. Working on
   cumulative rates keeps rounding errors from piling up, and rounding the cumulative counts
   up means at least the planned share has left by every head, so the realized calibration
   compute never exceeds the planned one (costs grow with depth). The CDF rule is a plain
   per-head threshold, a quantile of that head's confidence, so the runtime's rule
   "leave at the first exit k with confidence[k] >= threshold[k]" needs no change.

4. Refinement on the calibration tokens (ours; on by default, `refine=False` gives steps 1-3
   alone): a direct search of the thresholds for the most agreement within B, from four
   starts (exporter/budget_refine.py).

What the budget means. The budget is a share of the plain model's work: B = 0.6 means at
most 60% of the layer-positions the plain model runs (one decoder layer on one position), plus
the exit checks in `unit="compute"`. That is what the runtime measures
(`GenerationResult.work()`), and it holds for the KV policy that saves work, `fill`, where a
token leaving after l layers costs l layer-positions (its skipped layers get only their K/V
projections, a few % of a layer each, reported apart by the runtime and not in B). Under
`defer` the skipped layers of every position run later anyway, so the work is ~1 whatever the
thresholds (scores.simulate(..., kv_policy="defer")): there a budget buys fewer calls and
lower latency per token, not less work. The prompt runs the whole model under `fill`; the
budget is over generated tokens.

Units: `unit="compute"`, a fraction of the full model in (0, 1], check costs included, so with
check_cost > 0 running every token through the full model costs a little more than 1; or
`unit="layers"`, an average number of decoder layers per token. Guarantees are empirical, on the
calibration tokens and teacher-forced (each token's head on exact hidden states; with `fill` the
approximate keys/values of skipped layers can move later tokens); on new text the average moves
by sampling noise (about +-0.01 with a few thousand tokens in our synthetic tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .budget_refine import refine_thresholds
from .scores import NEVER, ExitScores, Outcome, simulate

DEFAULT_BETA = 0.04
UNITS = ("compute", "layers")


@dataclass(frozen=True)
class BudgetResult:
    """Thresholds for one budget, with the EERO quantities that produced them."""

    thresholds: np.ndarray  # (E,) per-exit confidence thresholds for the runtime (inf = exit off)
    eps: np.ndarray  # (E+1,) EERO exit rates, last = full model (sum 1); shares actually taken
    #                  on calibration, after any refinement, are outcome.coverage
    risk: np.ndarray  # (E+1,) R_l, disagreement with the full model on calibration (last 0)
    mu: float  # price of compute found by bisection (0 when the budget does not bind)
    beta: float
    budget: float  # as given, in `unit`
    unit: str  # "compute" (fraction of the full model) or "layers" (mean decoder layers)
    refined: bool
    origin: str  # start the thresholds came from: "eero", "shared", "lagrange-under/over"
    outcome: Outcome  # the thresholds applied to the calibration tokens

    @property
    def spent(self) -> float:
        """Average cost on the calibration tokens, in the budget's unit."""
        return self.outcome.layers if self.unit == "layers" else self.outcome.compute


def budget_costs(scores: ExitScores, budget: float, unit: str = "compute") -> tuple[np.ndarray, float]:
    """(E+1,) cost per exit and the budget, both as fractions of the full model; validates.

    unit="compute": costs() (layers plus exit checks), budget in (0, 1].
    unit="layers":  decoder layers only, budget in (0, num_layers] layers.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    budget = float(budget)
    top = 1.0 if unit == "compute" else float(scores.num_layers)
    if not np.isfinite(budget) or not 0.0 < budget <= top:
        what = "a fraction of full compute in (0, 1]" if unit == "compute" else f"a layer count in (0, {top:g}]"
        raise ValueError(f"budget must be {what}, got {budget}")
    if unit == "compute":
        cost = scores.costs()
        frac = budget
    else:
        cost = np.asarray(list(scores.exit_layers) + [scores.num_layers], dtype=np.float64) / scores.num_layers
        frac = budget / scores.num_layers
    if np.any(cost <= 0):
        raise ValueError(f"every exit must cost something (the prior is 1/cost), got costs {cost.tolist()}")
    cheapest = float(cost.min())
    if frac < cheapest - 1e-12:
        have = f"{cheapest:.4f} of full compute" if unit == "compute" else f"{cheapest * scores.num_layers:g} layers"
        raise ValueError(f"budget {budget:g} ({unit}) is below the cheapest possible policy: "
                         f"every token leaving at the first exit costs {have}")
    return cost, frac


def eero_rates(risk: np.ndarray, cost: np.ndarray, budget: float, *, beta: float = DEFAULT_BETA
               ) -> tuple[np.ndarray, float]:
    """(eps, mu): exponential-weights exit rates over all E+1 exits and the price of compute.

    eps_l ∝ (1/cost_l) exp(-(risk_l + mu cost_l) / beta), with the smallest mu >= 0 such that
    sum_l eps_l cost_l <= budget (all three as fractions of the full model).
    """
    risk = np.asarray(risk, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if budget < cost.min() - 1e-12:
        raise ValueError(f"budget {budget} is below the cheapest exit's cost {cost.min()}")
    log_prior = -np.log(cost)

    def rates(mu: float) -> np.ndarray:
        logw = log_prior - (risk + mu * cost) / beta
        w = np.exp(logw - logw.max())
        return w / w.sum()

    def spend(mu: float) -> float:
        return float(rates(mu) @ cost)

    if spend(0.0) <= budget:
        return rates(0.0), 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):  # grow the bracket; as mu grows all weight goes to the cheapest exit
        if spend(hi) <= budget:
            break
        lo, hi = hi, hi * 2.0
    else:  # pragma: no cover - budget ~ cheapest cost with ties we cannot resolve numerically
        raise ValueError(f"no mu meets budget {budget}")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if spend(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return rates(hi), hi


def rate_thresholds(scores: ExitScores, eps: np.ndarray) -> np.ndarray:
    """(E,) thresholds that make head l take (at least) eps_l of the tokens, sequentially.

    Head l takes the most confident of the tokens still there until the cumulative share
    eps_0 + ... + eps_l has left (rounded up; ties at the cut leave too).
    """
    n, e = scores.num_tokens, scores.num_exits
    eps = np.asarray(eps, dtype=np.float64)
    gone_by = np.ceil(np.round(np.cumsum(eps[:e]) * n, 9)).astype(np.int64)  # tokens out after head l
    thresholds = np.full(e, NEVER)
    remaining = np.ones(n, dtype=bool)
    gone = 0
    for l in range(e):
        want = min(int(gone_by[l]), n) - gone
        conf = scores.confidence[remaining, l]
        if want <= 0 or conf.size == 0:
            continue
        # F_l(t) >= 1 - want/|conf|: the want-th largest confidence among the tokens still here
        thresholds[l] = conf.min() if want >= conf.size else np.partition(conf, conf.size - want)[conf.size - want]
        take = remaining & (scores.confidence[:, l] >= thresholds[l])
        gone += int(take.sum())
        remaining &= ~take
    return thresholds


def budget_thresholds(scores: ExitScores, budget: float, *, beta: float = DEFAULT_BETA,
                      unit: str = "compute", refine: bool = True) -> BudgetResult:
    """EERO thresholds that keep the average cost on `scores` within `budget`.

    budget: fraction of the full model's compute in (0, 1] (unit="compute"), or an average
    number of decoder layers (unit="layers"). Raises ValueError for a budget outside that
    range or below the cheapest possible policy (every token at the first exit).
    """
    if scores.num_tokens == 0:
        raise ValueError("no calibration tokens")
    cost, frac = budget_costs(scores, budget, unit)
    risk = np.concatenate([1.0 - scores.agree.mean(axis=0), [0.0]])
    eps, mu = eero_rates(risk, cost, frac, beta=beta)
    thresholds = rate_thresholds(scores, eps)
    origin = "eero"
    if refine and scores.num_exits:
        thresholds, origin = refine_thresholds(scores, thresholds, cost, frac)
    return BudgetResult(thresholds=np.asarray(thresholds, dtype=np.float64), eps=eps, risk=risk, mu=float(mu),
                        beta=float(beta), budget=float(budget), unit=unit, refined=bool(refine), origin=origin,
                        outcome=simulate(scores, thresholds))
