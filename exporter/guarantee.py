"""Guarantee mode: exit thresholds whose agreement holds on new text with probability >= 1 - delta.

What holds, exactly. Assume the calibration windows (`ExitScores.sequence`) are i.i.d. draws
from the text the model will see and have equal lengths (LAMA's windows all have seq_len
tokens); tokens inside one window may depend on each other in any way. For a threshold
vector t and exit k, let L_k and D_k be the number of a window's tokens that leave at exit k
and, among those, the ones whose token differs from the full model's. The agreement among
exit k's leavers on new text is A_k(t) = 1 - E[D_k] / E[L_k]. Then, with probability
>= 1 - delta over the draw of the calibration windows, the returned thresholds satisfy
A_k(t) >= target for every exit k at once (vacuously for an exit no token reaches). Tokens
that no exit takes run the full model and agree by definition, so the overall agreement
is >= target as well.

How (Learn then Test, Angelopoulos et al. 2021, with windows as the unit):

* Candidates are threshold *vectors* fixed before seeing data: the first `first` exits off
  (early exits are the weak ones) and the others at one shared threshold lambda from GRID;
  E * G candidates in all. A family fixed in advance is what makes the exits' sequential
  filtering sound: which tokens reach exit k depends on the earlier exits' thresholds, and
  choosing those on the calibration data, then testing exit k as if they were fixed, is not
  valid (the choice can favour a draw that is lucky for exit k; a bound uniform over the
  earlier choices would cost log(G) per earlier exit). Here each hypothesis is a statement
  about one fixed rule. The price: the enabled exits share one threshold in this mode.
* Hypothesis H(first, lambda): "some enabled exit k has E[D_k - a L_k] > 0", a = 1 - target. Per exit the
  window statistic X = (D_k - a L_k) / n + a lies in [0, 1], and the exit's part of H says
  E[X] > a. A betting test (Waudby-Smith & Ramdas 2023, predictable plug-in bets) turns the
  windows into a p-value valid for any i.i.d. [0, 1] sequence, whatever the dependence
  inside a window, and adaptive to the (small) spread of X across windows. H is rejected
  when every enabled exit's part is: p = max over those exits (intersection-union test).
* Family-wise error: Bonferroni over the E * G candidates (each at level delta / (E G)),
  so all rejected candidates hold together with probability >= 1 - delta, and any of them
  may be returned: the one with the least compute on the calibration set. Fixed-sequence
  testing from strict to loose would avoid the factor, but at the strictest candidates
  almost no token leaves, no amount of data can reject those, and the sequence would stop
  at its first step; Bonferroni costs log(E G) (about 6-7 nats) of evidence instead.

In practice windows, not tokens, are the sample size: 20,000 calibration tokens in 156
windows of 128 carry far less evidence than 20,000 independent tokens would, and at tight
targets the honest answer is often "never exit" until more (or shorter) windows are used.
"""

from __future__ import annotations

import numpy as np

from .scores import NEVER, ExitScores

GRID = np.linspace(0.0, 1.0, 101)  # shared thresholds, fixed before seeing data
BET_CAP = 0.5  # bets at most half the capital's reach: robust to a few very bad windows
ORDER_SEED = 0  # windows are bet on in a fixed random order (any data-independent order is valid)


def betting_pvalues(x: np.ndarray, mu0: float, level: float) -> np.ndarray:
    """p-values for H0: E[X] >= mu0, one per column of x (m windows, C columns), X i.i.d. in [0, 1].

    Capital K_i = prod_{j <= i} (1 + b_j (mu0 - X_j)) with bets b_j in [0, BET_CAP / (1 - mu0)]
    chosen from X_1..X_{j-1} only. Under H0 every factor has mean <= 1, so K is a nonnegative
    supermartingale and Ville's inequality gives P(max_i K_i >= 1/p) <= p: p = 1 / max_i K_i.
    The bet size is WSR's plug-in sqrt(2 log(1/level) / (m var)), from a running variance.
    """
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    total = np.full(x.shape[1:], 0.5)  # running sums with WSR's prior pseudo-observation
    sq = np.full(x.shape[1:], 0.25)
    log_k = np.zeros(x.shape[1:])
    best = np.zeros(x.shape[1:])
    cap = BET_CAP / (1.0 - mu0)
    for i in range(m):
        var = sq / (i + 1)
        bet = np.minimum(np.sqrt(2.0 * np.log(1.0 / level) / (m * np.maximum(var, 1e-12))), cap)
        log_k += np.log1p(bet * (mu0 - x[i]))
        np.maximum(best, log_k, out=best)
        total += x[i]
        sq += (x[i] - total / (i + 2)) ** 2
    return np.minimum(1.0, np.exp(-best))


def leave_counts(scores: ExitScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window, for every candidate (first, lambda) of the family and every exit k: how many
    tokens leave at k (L) and how many of those disagree (D); and each window's length n.

    L, D: (m, F, G, E) for F = E choices of the first enabled exit and G = len(GRID).
    With exits first.. enabled at a shared lambda, a token leaves at k >= first exactly when
    max(conf[first:k]) < lambda <= conf[k]: one interval of the grid per (token, first, k),
    so all candidates are counted in one pass (difference arrays summed over the grid).
    """
    _, window = np.unique(scores.sequence, return_inverse=True)
    m, e, g = int(window.max()) + 1, scores.num_exits, len(GRID)
    conf = scores.confidence
    L = np.zeros((m, e, e, g + 1))
    D = np.zeros((m, e, e, g + 1))
    for first in range(e):
        below = np.full(scores.num_tokens, -np.inf)  # max confidence of the enabled exits before k
        for k in range(first, e):
            lo = np.searchsorted(GRID, below, side="right")  # first grid lambda > below
            hi = np.searchsorted(GRID, conf[:, k], side="right")  # grid lambdas <= conf[k]
            rows = np.flatnonzero(lo < hi)
            for arr, weight in ((L, 1.0), (D, (~scores.agree[rows, k]).astype(float))):
                np.add.at(arr, (window[rows], first, k, lo[rows]), weight)
                np.add.at(arr, (window[rows], first, k, hi[rows]), -weight)
            below = np.maximum(below, conf[:, k])
    L = np.cumsum(L, axis=-1)[..., :g].transpose(0, 1, 3, 2)
    D = np.cumsum(D, axis=-1)[..., :g].transpose(0, 1, 3, 2)
    return L, D, np.bincount(window, minlength=m).astype(float)


def candidate_thresholds(num_exits: int, first: int, lam: float) -> list[float]:
    """The fixed family: exits before `first` off, the rest at the shared threshold lambda."""
    return [NEVER] * first + [float(lam)] * (num_exits - first)


def guarantee_thresholds(scores: ExitScores, target: float, delta: float) -> list[float]:
    """Among the candidates whose hypothesis is rejected at delta / (number of candidates),
    the one computing the least on the calibration set; NEVER everywhere when none is.
    See the module docstring for what this guarantees."""
    alpha = 1.0 - target
    e = scores.num_exits
    if scores.num_tokens == 0 or alpha <= 0:  # target 1: no data can show zero disagreement
        return [NEVER] * e
    L, D, n = leave_counts(scores)  # (m, F, G, E)
    x = (D - alpha * L) / n[:, None, None, None] + alpha
    x = x[np.random.default_rng(ORDER_SEED).permutation(len(n))]
    level = delta / (e * len(GRID))
    p = betting_pvalues(x, alpha, level)  # (F, G, E)
    enabled = np.arange(e)[None, :] >= np.arange(e)[:, None]  # (F, E): exit k is on when k >= first
    p = np.where(enabled[:, None, :], p, 0.0).max(axis=-1)  # (F, G): every enabled exit shown good
    ok = np.argwhere(p <= level)
    if ok.size == 0:
        return [NEVER] * e
    # any rejected candidate is covered by the guarantee; take the cheapest on the calibration set
    share = L.sum(axis=0) / scores.num_tokens  # (F, G, E) share of tokens leaving at each exit
    costs = scores.costs()
    compute = (share * costs[:e]).sum(-1) + (1.0 - share.sum(-1)) * costs[e]
    first, g = min(map(tuple, ok), key=lambda c: (compute[c], -GRID[c[1]]))
    return candidate_thresholds(e, first, GRID[g])
