"""Budgeted exit policy after EERO: exit thresholds that hold an average compute budget.

Threshold calibration (`calibrate.py`) asks "how early can tokens leave while agreement with
the full model stays >= target?". This module asks the dual question: "given an average
compute budget B, which thresholds give the most agreement?". It follows

    F. Valade, M. Hebiri, P. Gay. "EERO: Early Exit with Reject Option for Efficient
    Classification with limited budget." UAI 2025, PMLR 286:4290-4308 (arXiv:2402.03779).

EERO treats every exit as a classifier with a reject option: head l either answers or passes
the token on. Notation, with heads l = 0..E-1 and l = E the full model:

    B_l   cost of leaving at l, a share of the chain without early exits (`ExitScores.costs()`
          over its last entry, so B_E = 1)
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

What the budget means. The budget is a share of what this checkpoint's chain costs when no token
leaves early: the plain model's layer-positions (one decoder layer on one position) plus every
exit check, counted under the KV policy that will run (`kv_policy`). So `budget 1` is "the full
model's cost" as the export runs it, and gives the full model's output: every exit is off, no
token is forced out. Feasible budgets run from the cheapest policy (every token leaves at the first
exit, `BudgetRange.cheapest`) to 1; a budget below the cheapest is refused naming that range, one
at or above 1 turns the exits off. Earlier versions counted the budget in shares of the plain
model alone, so with checks that cost a lot (stories260K's in-graph heads run the LM head, 0.77 of
a layer each: the chain with its checks costs 1.61x the plain model) `budget 1` forced most tokens
out at layer ~1.8 and the output was garbage; `BudgetRange.chain_compute` gives that multiple.

Work is counted as the runtime counts it (`GenerationResult.work()`). Under `fill`, the policy that
saves work, a token leaving after l layers costs l layer-positions (its skipped layers get only
their K/V projections, a few % of a layer each, reported apart by the runtime and not in B).
Under `defer` (the runtime's default) the skipped layers of every position run later anyway, so
every token costs all the layers and exits save only the checks they skip: the feasible range is
then close to [1, 1] and a budget buys fewer calls and lower latency per token, not less work.
The prompt runs the whole model under `fill`; the budget is over generated tokens.

Units: `unit="compute"`, a share of the chain without early exits (checks included, above); or
`unit="layers"`, an average number of decoder layer-positions per token under the KV policy
(checks not counted; `num_layers` = no early exit). Guarantees are empirical, on the
calibration tokens and teacher-forced (each token's head on exact hidden states; with `fill` the
approximate keys/values of skipped layers can move later tokens); on new text the average moves
by sampling noise (about +-0.01 with a few thousand tokens in our synthetic tests). Agreement is
not promised at all: `budget_for_agreement` finds the smallest budget that keeps a floor of it,
and `lama calibrate --budget` refuses budgets below that (`--min-agreement`, default 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .budget_refine import refine_thresholds
from .scores import NEVER, ExitScores, Outcome, simulate

DEFAULT_BETA = 0.04
UNITS = ("compute", "layers")


@dataclass(frozen=True)
class BudgetRange:
    """The budgets that mean something for one set of scores, unit and KV policy.

    cheapest: every token leaves at the first exit; never: no token leaves early (1 in
    unit="compute", num_layers in unit="layers"). A budget below `cheapest` is refused; one at
    or above `never` turns the exits off (the full model's output).
    """

    cheapest: float  # in `unit`
    never: float  # in `unit`
    unit: str
    kv_policy: str
    chain_compute: float  # the chain without early exits, in multiples of the plain model's compute
    cheapest_compute: float  # the cheapest policy, in the same multiples
    check_cost: float  # one exit check, in decoder layers

    def describe(self) -> str:
        """One line: the range, and what its ends cost next to the plain model."""
        if self.unit == "layers":
            return (f"feasible budgets under the {self.kv_policy} KV policy: {self.cheapest:.4g} layers per token "
                    f"(every token leaves at the first exit) to {self.never:g} (no early exit: the full model)")
        return (f"feasible budgets under the {self.kv_policy} KV policy: {self.cheapest:.4f} (every token leaves at "
                f"the first exit, {self.cheapest_compute:.3f}x the plain model's compute) to 1 (no early exit: the "
                f"full model's output; {self.chain_compute:.3f}x the plain model's compute with the exit checks, "
                f"{self.check_cost:.3g} layers each)")


def budget_range(scores: ExitScores, unit: str = "compute", kv_policy: str = "fill") -> BudgetRange:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    plain = scores.costs(kv_policy)  # (E+1,) multiples of the plain model's compute, checks included
    chain = float(plain[-1])
    if unit == "compute":
        cheapest, never = float(plain.min()) / chain, 1.0
    else:
        layers = scores.layers(kv_policy)
        cheapest, never = float(layers.min()), float(scores.num_layers)
    return BudgetRange(cheapest, never, unit, kv_policy, chain, float(plain.min()), float(scores.check_cost))


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
    unit: str  # "compute" (share of the chain without early exits) or "layers" (mean decoder layers)
    refined: bool
    origin: str  # start the thresholds came from: "eero", "shared", "lagrange-under/over", or
    #              "never" (budget >= the chain without early exits: every exit off)
    outcome: Outcome  # the thresholds applied to the calibration tokens, work counted under kv_policy
    range: BudgetRange
    kv_policy: str = "fill"

    @property
    def spent(self) -> float:
        """Average cost on the calibration tokens, in the budget's unit."""
        return self.outcome.layers if self.unit == "layers" else self.outcome.compute / self.range.chain_compute


def spent(scores: ExitScores, thresholds, unit: str = "compute", kv_policy: str = "fill") -> float:
    """Average cost of `thresholds` on `scores`, in the budget's unit (held-out checks)."""
    out = simulate(scores, thresholds, kv_policy)
    return out.layers if unit == "layers" else out.compute / float(scores.costs(kv_policy)[-1])


def budget_costs(scores: ExitScores, budget: float, unit: str = "compute", kv_policy: str = "fill"
                 ) -> tuple[np.ndarray, float]:
    """(E+1,) cost per exit and the budget, both as shares of the chain without early exits; validates.

    unit="compute": costs() (layers plus exit checks) over its last entry; unit="layers":
    layer-positions only, over num_layers. A share >= 1 means no early exit; below the cheapest
    exit's share the budget is refused, naming the feasible range.
    """
    rng = budget_range(scores, unit, kv_policy)
    budget = float(budget)
    if not np.isfinite(budget) or budget <= 0.0:
        what = "a share of the chain's compute (1 = no early exit)" if unit == "compute" else "a layer count"
        raise ValueError(f"budget must be a positive number, {what}; got {budget}; {rng.describe()}")
    if unit == "compute":
        cost = scores.costs(kv_policy) / rng.chain_compute
        frac = budget
    else:
        cost = scores.layers(kv_policy) / scores.num_layers
        frac = budget / scores.num_layers
    if np.any(cost <= 0):
        raise ValueError(f"every exit must cost something (the prior is 1/cost), got costs {cost.tolist()}")
    if frac < float(cost.min()) - 1e-12:
        raise ValueError(f"budget {budget:g} ({unit}) is below the cheapest possible policy; {rng.describe()}")
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
                      unit: str = "compute", refine: bool = True, kv_policy: str = "fill") -> BudgetResult:
    """EERO thresholds that keep the average cost on `scores` within `budget`.

    budget: share of the chain without early exits (unit="compute": the plain model plus every
    exit check, under `kv_policy`), or an average number of decoder layer-positions
    (unit="layers"). At or above the no-exit cost every exit is off (the full model's output).
    Raises ValueError for a budget that is not a positive number or below the cheapest possible
    policy (every token at the first exit), naming the feasible range.
    """
    if scores.num_tokens == 0:
        raise ValueError("no calibration tokens")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    cost, frac = budget_costs(scores, budget, unit, kv_policy)
    rng = budget_range(scores, unit, kv_policy)
    risk = np.concatenate([1.0 - scores.agree.mean(axis=0), [0.0]])
    if frac >= 1.0 - 1e-12:  # the full model fits: no token is forced out
        thresholds = np.full(scores.num_exits, NEVER)
        eps = np.zeros(scores.num_exits + 1)
        eps[-1] = 1.0
        return BudgetResult(thresholds=thresholds, eps=eps, risk=risk, mu=0.0, beta=float(beta), budget=float(budget),
                            unit=unit, refined=False, origin="never", outcome=simulate(scores, thresholds, kv_policy),
                            range=rng, kv_policy=kv_policy)
    eps, mu = eero_rates(risk, cost, frac, beta=beta)
    thresholds = rate_thresholds(scores, eps)
    origin = "eero"
    if refine and scores.num_exits:
        thresholds, origin = refine_thresholds(scores, thresholds, cost, frac)
    return BudgetResult(thresholds=np.asarray(thresholds, dtype=np.float64), eps=eps, risk=risk, mu=float(mu),
                        beta=float(beta), budget=float(budget), unit=unit, refined=bool(refine), origin=origin,
                        outcome=simulate(scores, thresholds, kv_policy), range=rng, kv_policy=kv_policy)


def budget_for_agreement(scores: ExitScores, floor: float, *, heldout: ExitScores | None = None,
                         unit: str = "compute", kv_policy: str = "fill", beta: float = DEFAULT_BETA,
                         steps: int = 6, below: float | None = None) -> float:
    """About the smallest budget whose thresholds (fitted on `scores`, refined as by default) keep
    agreement >= floor on `heldout` (default: `scores`): a bisection of `steps` fits between the
    cheapest policy (or `below`, a budget known to fall short) and the no-exit budget (1, or
    num_layers), which always keeps it; the answer is within (that width) / 2**steps above it."""
    rng = budget_range(scores, unit, kv_policy)
    check = scores if heldout is None else heldout

    def ok(b: float) -> bool:
        th = budget_thresholds(scores, b, beta=beta, unit=unit, kv_policy=kv_policy).thresholds
        return simulate(check, th, kv_policy).agreement >= floor

    lo, hi = (rng.cheapest, rng.never) if below is None else (float(below), rng.never)
    if below is None and ok(lo):
        return lo
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
