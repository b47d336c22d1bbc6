"""Step 4 of the budgeted exit policy (exporter/budget.py): refinement on the calibration tokens.

With one risk per head the exponential weights can misplace rates: on synthetic
scores pure EERO lost up to 0.08 agreement to a single shared threshold at budgets 0.4-0.5,
and with perfectly separable confidences at the oracle's compute it reached 0.86 where 1.0
is attainable; they also leave budget unused when mu = 0. So we search the thresholds
directly for the most agreement with mean cost <= B, from four starts: the EERO thresholds;
the single shared threshold that meets B; and the two solutions bracketing B of the
per-token version of EERO's objective, max sum_tokens (agree - lam * cost), found by exact
per-head coordinate ascent with lam set by bisection (lam plays mu's role; the bracketing
pair matters because that frontier is not concave). From each start a greedy local search
moves blocks of tokens across one head's threshold (10% of the tokens down to 0.25%): it
repairs an over-budget start at the least agreement lost per unit of compute, spends unused
budget where agreement gains most per unit, then trades compute between heads (save at the
head that loses least per unit, spend where it gains most) while agreement strictly rises.
The best start wins (`BudgetResult.origin`). Every candidate stays within B on the
calibration tokens, so the budget guarantee of step 3 is kept.
"""

from __future__ import annotations

import numpy as np

from .scores import NEVER, ExitScores, exit_index

_LAMBDA_STEPS = 30  # bisection steps on the price of compute in the refinement
# Block sizes of the local refinement, as shares of the calibration tokens (coarse to fine).
_REFINE_STEPS = (0.1, 0.04, 0.02, 0.01, 0.005, 0.0025)


class _Refiner:
    """Thresholds and per-token exits on calibration, searched in step 4 of the module doc:
    block moves for the greedy search (`run`) and exact per-head best responses for the
    Lagrangian objective (`ascend`).

    Changing one head's threshold only moves the tokens that cross it, so each candidate move
    is priced on those tokens alone: (change in agreeing tokens, change in total cost).
    """

    def __init__(self, scores: ExitScores, thresholds: np.ndarray, cost: np.ndarray, budget: float):
        n = scores.num_tokens
        self.conf = scores.confidence  # (N, E)
        self.ok = np.concatenate([scores.agree, np.ones((n, 1), dtype=bool)], axis=1)  # (N, E+1)
        self.cost = cost
        self.e = scores.num_exits
        self.th = np.array(thresholds, dtype=np.float64)
        self.idx = exit_index(scores, self.th)  # (N,) exit taken
        self.total = float(cost[self.idx].sum())
        self.cap = budget * n + 1e-9 * n

    def agreeing(self) -> int:
        return int(self.ok[np.arange(self.idx.size), self.idx].sum())

    def _downstream(self, rows: np.ndarray, start: int) -> np.ndarray:
        """First exit >= start each row passes under the current thresholds (E = full model)."""
        if start >= self.e:
            return np.full(rows.size, self.e)
        passes = self.conf[rows, start:] >= self.th[None, start:]
        return np.where(passes.any(axis=1), start + passes.argmax(axis=1), self.e)

    def move(self, head: int, earlier: bool, step: int):
        """(d_agree, d_cost, head, new_threshold, rows, new_exits) or None.

        earlier=True: the `step` most confident tokens that pass `head` now leave there.
        earlier=False: the `step` least confident tokens leaving at `head` go on.
        """
        if earlier:
            rows = np.flatnonzero(self.idx > head)
            if rows.size == 0:
                return None
            c = self.conf[rows, head]
            k = min(step, c.size)
            t = np.partition(c, c.size - k)[c.size - k]
            rows = rows[c >= t]
            new = np.full(rows.size, head)
        else:
            rows = np.flatnonzero(self.idx == head)
            if rows.size == 0:
                return None
            c = self.conf[rows, head]
            t = NEVER if step >= c.size else np.partition(c, step)[step]
            rows = rows[c < t]
            if rows.size == 0:
                return None
            new = self._downstream(rows, head + 1)
        old = self.idx[rows]
        d_agree = int(self.ok[rows, new].sum()) - int(self.ok[rows, old].sum())
        d_cost = float(self.cost[new].sum() - self.cost[old].sum())
        return d_agree, d_cost, head, float(t), rows, new

    def apply(self, m):
        _, d_cost, head, t, rows, new = m
        undo = (head, self.th[head], rows, self.idx[rows].copy(), self.total)
        self.th[head] = t
        self.idx[rows] = new
        self.total += d_cost
        return undo

    def undo(self, u) -> None:
        head, t, rows, old, total = u
        self.th[head], self.total = t, total
        self.idx[rows] = old

    def moves(self, step: int, earlier: bool | None = None) -> list:
        dirs = (True, False) if earlier is None else (earlier,)
        out = [self.move(h, d, step) for h in range(self.e) for d in dirs]
        return [m for m in out if m is not None]

    def best_spend(self, step: int, gain_floor: int, per_cost: bool = True):
        """Move with agreement gain > gain_floor that fits the budget: free wins first, then
        the best gain per unit of compute (per_cost) or the largest gain."""
        slack = self.cap - self.total
        fits = [m for m in self.moves(step) if m[0] > gain_floor and m[1] <= slack]
        if per_cost:
            return max(fits, key=lambda m: (m[1] <= 0, m[0] / max(m[1], 1e-12), m[0]), default=None)
        return max(fits, key=lambda m: (m[0], -m[1]), default=None)

    def best_response(self, head: int, lam: float) -> bool:
        """Set head's threshold to maximize sum(agree - lam * cost) given the other heads."""
        rows = np.flatnonzero(self.idx >= head)
        if rows.size == 0:
            return False
        go = self._downstream(rows, head + 1)
        c = self.conf[rows, head]
        order = np.argsort(-c, kind="stable")
        c = c[order]
        delta = (self.ok[rows, head] - lam * self.cost[head]) - (self.ok[rows, go] - lam * self.cost[go])
        gain = np.concatenate([[0.0], np.cumsum(delta[order])])
        cut = np.ones(rows.size + 1, dtype=bool)
        cut[1:-1] = c[:-1] > c[1:]  # only cut between distinct confidences
        gain[~cut] = -np.inf
        k = int(np.argmax(gain))
        if gain[k] <= gain[int(np.sum(c >= self.th[head]))] + 1e-9:  # no strict gain: keep (ends the ascent)
            return False
        t = NEVER if k == 0 else float(c[k - 1])
        self.th[head] = t
        new = np.where(self.conf[rows, head] >= t, head, go)
        self.total += float(self.cost[new].sum() - self.cost[self.idx[rows]].sum())
        self.idx[rows] = new
        return True

    def ascend(self, lam: float, rounds: int = 50) -> None:
        for _ in range(rounds):
            if not any([self.best_response(h, lam) for h in range(self.e)]):
                return

    def run(self, step: int) -> None:
        while self.total > self.cap:  # repair an infeasible start: cheapest loss per saving
            saves = [m for m in self.moves(step, earlier=True) if m[1] < 0]
            if not saves:
                break
            self.apply(min(saves, key=lambda m: -m[0] / -m[1]))
        for _ in range(self.conf.shape[0] + 1):  # every accepted step gains >= 1 agreeing token
            m = self.best_spend(step, 0)
            if m is not None:
                self.apply(m)
                continue
            saves = sorted((m for m in self.moves(step) if m[1] < 0), key=lambda m: -m[0] / -m[1])
            for save in saves:  # trade: save here, spend elsewhere, keep if agreement rises
                u = self.apply(save)
                spend = self.best_spend(step, -save[0], per_cost=False)
                if spend is not None:
                    self.apply(spend)
                    break
                self.undo(u)
            else:
                return


def refine_thresholds(scores: ExitScores, eero: np.ndarray, cost: np.ndarray, frac: float) -> tuple[np.ndarray, str]:
    """(thresholds, origin): the best of four starts after greedy local search, within the budget."""
    starts = {"eero": eero, "shared": _uniform_thresholds(scores, cost, frac)}
    gaps = np.diff(np.unique(cost))
    lo, hi = 0.0, 2.0 / gaps.min() if gaps.size else 1.0  # at hi every token takes the cheapest exit
    for _ in range(_LAMBDA_STEPS):
        lam = 0.5 * (lo + hi)
        search = _Refiner(scores, eero, cost, frac)
        search.ascend(lam)
        if search.total <= search.cap:
            hi, starts["lagrange-under"] = lam, search.th
        else:
            lo, starts["lagrange-over"] = lam, search.th
    best, best_agree = (eero, "eero"), -1
    for name, start in starts.items():
        search = _Refiner(scores, start, cost, frac)
        for share in _REFINE_STEPS:
            search.run(max(1, int(round(share * scores.num_tokens))))
        if search.total <= search.cap and search.agreeing() > best_agree:
            best, best_agree = (search.th, name), search.agreeing()
    return best


def _uniform_thresholds(scores: ExitScores, cost: np.ndarray, frac: float) -> np.ndarray:
    """(E,) one threshold shared by all exits: the highest one whose mean cost stays <= frac.

    The mean cost only grows with the threshold, so bisect over the distinct confidences.
    """
    values = np.append(np.unique(scores.confidence), NEVER)  # NEVER: every token runs the full model

    def fits(i: int) -> bool:
        return cost[exit_index(scores, np.full(scores.num_exits, values[i]))].mean() <= frac + 1e-12

    lo, hi = 0, values.size - 1  # fits(0): everyone leaves at the first exit, cheapest (validated)
    while lo < hi:  # largest i with fits(i)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return np.full(scores.num_exits, values[lo])
