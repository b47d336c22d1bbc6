"""Budgeted EERO exit policy (exporter/budget.py) and its benchmark, on seeded synthetic scores."""

from __future__ import annotations

import importlib
import importlib.util
import json

import numpy as np
import pytest

from exporter.budget import BudgetResult, budget_range, budget_thresholds, eero_rates, rate_thresholds, spent
from exporter.scores import ExitScores, oracle, simulate

EXITS = (3, 6, 9, 12, 15, 18, 21, 24, 27)  # 9 exits in a 30-layer model


def graded(n: int, seed: int) -> ExitScores:
    """Each token settles at a depth d; head l agrees with a probability rising past d, and its
    confidence is a noisy function of agreement (deeper heads more informative)."""
    rng = np.random.default_rng(seed)
    depth = np.asarray(EXITS) / 30
    d = rng.beta(1.0, 1.5, size=n)
    p = 0.1 + 0.88 / (1 + np.exp(-(depth[None] - d[:, None]) / 0.08))
    agree = rng.random((n, len(EXITS))) < p
    z = (1.6 * (2 * agree - 1) * (0.5 + depth[None]) + rng.normal(0, 1, agree.shape)
         + rng.normal(0, 0.5, (n, 1)) + np.linspace(1.0, -0.5, len(EXITS))[None])
    return ExitScores(1 / (1 + np.exp(-z)), agree, np.arange(n) // 64, list(EXITS), 30, check_cost=0.02)


def miscalibrated(n: int, seed: int) -> ExitScores:
    """Five heads whose confidence scales differ a lot: one shared threshold cannot suit all."""
    rng = np.random.default_rng(seed)
    layers = (2, 4, 6, 8, 10)
    depth = np.asarray(layers) / 12
    d = rng.uniform(0, 1, n)
    agree = rng.random((n, 5)) < 0.05 + 0.9 / (1 + np.exp(-(depth[None] - d[:, None]) / 0.1))
    z = 1.2 * (2 * agree - 1) + rng.normal(0, 1, agree.shape) + np.array([2.0, -1.0, 1.0, -0.5, 0.0])[None]
    return ExitScores(1 / (1 + np.exp(-z)), agree, np.arange(n) // 32, list(layers), 12)


def separable(n: int, seed: int) -> tuple[ExitScores, np.ndarray]:
    """Known optimum: token i first agrees at exit k_i (9 = only the full model) and keeps
    agreeing; confidence is > 0.55 exactly where the head agrees. At budget = oracle compute the
    only policy with agreement 1 sends every token to k_i, so coverage must equal P(k)."""
    rng = np.random.default_rng(seed)
    e = len(EXITS)
    settle = rng.choice(e + 1, size=n, p=np.r_[np.full(e, 0.8 / e), 0.2])
    agree = np.arange(e)[None, :] >= settle[:, None]
    conf = np.where(agree, 0.75, 0.25) + rng.uniform(-0.2, 0.2, (n, e))
    return ExitScores(conf, agree, np.arange(n) // 64, list(EXITS), 30), settle


def shared_threshold(scores: ExitScores, budget: float) -> float:
    """Baseline: one threshold for every exit, the highest (most compute) within the budget."""
    lo, hi = 0.0, 1.0 + 1e-9
    for _ in range(60):
        t = 0.5 * (lo + hi)
        lo, hi = (t, hi) if spent(scores, [t] * scores.num_exits) <= budget else (lo, t)
    return lo


_FITS: dict = {}


def fit(kind: str, budget: float, refine: bool = True) -> BudgetResult:
    """Fits are shared between tests (each takes ~0.3 s)."""
    key = (kind, budget, refine)
    if key not in _FITS:
        _FITS[key] = budget_thresholds(DATA[kind](3000, 0), budget, refine=refine)
    return _FITS[key]


DATA = {"graded": graded, "miscalibrated": miscalibrated}
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)


# (1) the budget holds on calibration -------------------------------------------------------


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("budget", BUDGETS + (1.0,))
def test_budget_met_on_calibration(kind, budget):
    res = fit(kind, budget)
    out = res.outcome
    assert res.spent <= budget + 1e-9  # never over (in shares of the chain without early exits)
    # and within 0.02 under it, unless every calibration token already agrees (nothing to buy)
    assert res.spent >= budget - 0.02 or out.agreement == 1.0, (res.spent, out.agreement)
    cal = DATA[kind](10, 0)
    assert res.spent == pytest.approx(out.compute / cal.costs()[-1]) and res.thresholds.shape == (len(res.risk) - 1,)


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("budget", BUDGETS)
def test_eero_rates_alone_meet_budget(kind, budget):
    """Steps 1-3 alone: planned cost == budget when mu > 0, realized cost never above it."""
    res = fit(kind, budget, refine=False)
    cost = DATA[kind](10, 0).costs()
    cost = cost / cost[-1]  # shares of the chain without early exits, the budget's unit
    assert res.mu > 0 and abs(res.eps @ cost - budget) < 1e-6
    assert budget - 0.02 <= res.spent <= budget + 1e-9


def test_known_optimum_separable_confidences():
    scores, settle = separable(3000, 0)
    best = oracle(scores).compute  # 0.598 here
    res = budget_thresholds(scores, best)
    share = np.bincount(settle, minlength=10)[:9] / scores.num_tokens
    assert res.outcome.agreement == 1.0 and res.outcome.compute <= best + 1e-9
    np.testing.assert_allclose(res.outcome.coverage, share, atol=1e-9)
    held, _ = separable(3000, 1)
    assert simulate(held, res.thresholds).agreement >= 0.995
    # pure EERO rates do not find it (measured 0.859): the refinement is what gets there
    assert budget_thresholds(scores, best, refine=False).outcome.agreement < 0.95


# (2) no worse than one shared threshold at the same budget ----------------------------------


@pytest.mark.parametrize("kind,min_mean_gain", [("graded", 0.005), ("miscalibrated", 0.03)])
def test_not_worse_than_shared_threshold(kind, min_mean_gain):
    cal, held = DATA[kind](3000, 0), DATA[kind](3000, 1)
    gains = []
    for budget in BUDGETS:
        t = shared_threshold(cal, budget)
        base_cal, base_held = simulate(cal, [t] * cal.num_exits), simulate(held, [t] * cal.num_exits)
        res = fit(kind, budget)
        ours_held = simulate(held, res.thresholds)
        assert res.outcome.agreement >= base_cal.agreement - 1e-12
        assert res.spent <= max(spent(cal, [t] * cal.num_exits), budget) + 1e-9
        assert ours_held.agreement >= base_held.agreement - 0.01, (budget, ours_held.agreement, base_held.agreement)
        assert spent(held, res.thresholds) <= spent(held, [t] * cal.num_exits) + 0.02
        gains.append(ours_held.agreement - base_held.agreement)
    assert np.mean(gains) >= min_mean_gain, gains


@pytest.mark.parametrize("kind", DATA)
def test_refinement_never_loses_to_eero_rates(kind):
    for budget in BUDGETS:
        assert fit(kind, budget).outcome.agreement >= fit(kind, budget, refine=False).outcome.agreement


# (3) the budget holds on held-out tokens -----------------------------------------------------


@pytest.mark.parametrize("kind", DATA)
def test_budget_holds_on_heldout(kind):
    held = DATA[kind](3000, 1)
    for budget in BUDGETS:
        used = spent(held, fit(kind, budget).thresholds)
        assert abs(used - budget) <= 0.03, (budget, used)


def test_layers_unit():
    cal, held = graded(3000, 0), graded(3000, 1)
    res = budget_thresholds(cal, 12.0, unit="layers")
    assert res.unit == "layers" and res.spent == res.outcome.layers
    assert 12.0 - 0.6 <= res.outcome.layers <= 12.0 + 1e-9
    assert abs(simulate(held, res.thresholds).layers - 12.0) <= 0.9  # 0.03 of 30 layers


# (4) bad budgets --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget,unit,match", [
    (0.0, "compute", r"positive number"),
    (-0.2, "compute", r"positive number"),
    (float("nan"), "compute", r"positive number"),
    (float("inf"), "compute", r"positive number"),
    (0.05, "compute", r"below the cheapest possible policy; feasible budgets under the fill KV policy: 0\.1001 .*"
                      r"to 1 \(no early exit.*1\.006x the plain model"),
    (2.0, "layers", r"below the cheapest possible policy; feasible budgets .*: 3 layers per token .* to 30"),
    (0.5, "tokens", r"unit must be one of"),
])
def test_bad_budget(budget, unit, match):
    with pytest.raises(ValueError, match=match):
        budget_thresholds(graded(200, 0), budget, unit=unit)


@pytest.mark.parametrize("budget,unit", [(1.0, "compute"), (1.2, "compute"), (30.0, "layers"), (31.0, "layers")])
def test_budget_at_or_above_the_chain_turns_the_exits_off(budget, unit):
    """At or above the cost of the chain without early exits, no token is forced out: the full
    model's output (on calibration and on held-out tokens), whatever the checks cost."""
    res = budget_thresholds(graded(2000, 0), budget, unit=unit)
    assert res.origin == "never" and np.all(np.isinf(res.thresholds))
    assert res.outcome.agreement == 1.0 and simulate(graded(2000, 1), res.thresholds).agreement == 1.0
    assert res.spent == (1.0 if unit == "compute" else 30.0)
    below = budget_thresholds(graded(2000, 0), 0.97 if unit == "compute" else 29.0, unit=unit)
    assert below.origin != "never" and np.isfinite(below.thresholds).any()  # else the test could not fail


def test_bad_beta_and_empty_scores():
    with pytest.raises(ValueError, match="beta must be > 0"):
        budget_thresholds(graded(200, 0), 0.5, beta=0.0)
    empty = graded(200, 0).subset(np.zeros(200, dtype=bool))
    with pytest.raises(ValueError, match="no calibration tokens"):
        budget_thresholds(empty, 0.5)


# building blocks ------------------------------------------------------------------------------


def test_eero_rates_properties():
    cost = np.array([0.2, 0.4, 0.6, 1.0])
    risk = np.array([0.5, 0.3, 0.1, 0.0])
    eps, mu = eero_rates(risk, cost, 0.5)
    assert mu > 0 and abs(eps.sum() - 1) < 1e-12 and abs(eps @ cost - 0.5) < 1e-9
    tight, mu_tight = eero_rates(risk, cost, 0.3)
    assert mu_tight > mu and tight @ cost < eps @ cost
    loose, mu_loose = eero_rates(risk, cost, 1.0)  # does not bind: mu = 0, Gibbs weights at the prior
    assert mu_loose == 0.0 and loose @ cost <= 1.0
    w = np.exp(-risk / 0.04) / cost
    np.testing.assert_allclose(loose, w / w.sum())
    flat, _ = eero_rates(risk, cost, 1.0, beta=1e6)  # huge beta: rates -> prior ∝ 1/cost
    np.testing.assert_allclose(flat, (1 / cost) / (1 / cost).sum(), rtol=1e-4)
    riskier, _ = eero_rates(np.array([0.6, 0.3, 0.1, 0.0]), cost, 0.5)
    assert riskier[0] < eps[0]
    everyone_first, _ = eero_rates(risk, cost, 0.2)  # budget = cheapest exit: all weight there
    assert everyone_first[0] > 1 - 1e-9


def test_rate_thresholds_take_the_planned_shares():
    scores = graded(2000, 3)  # continuous confidences: no ties
    eps = np.array([0.1, 0.05, 0.2, 0.0, 0.1, 0.05, 0.1, 0.1, 0.1, 0.2])
    out = simulate(scores, rate_thresholds(scores, eps))
    gone = np.cumsum(out.coverage)
    np.testing.assert_array_equal(np.round(gone * 2000), np.ceil(np.round(np.cumsum(eps[:9]) * 2000, 9)))
    # each head took the most confident of the tokens that reached it
    for k in range(9):
        reached = out.exit_index >= k
        took = out.exit_index == k
        if took.any() and (reached & ~took).any():
            assert scores.confidence[took, k].min() > scores.confidence[reached & ~took, k].max()


# benchmark script -------------------------------------------------------------------------------


def _load_script():
    return importlib.import_module("benchmarks.studies.budget_curve")


def test_budget_oracle_is_an_upper_bound():
    script = _load_script()
    scores = graded(2000, 5)
    for budget in (0.3, 0.5, 0.7):
        agreement, compute, _ = script.budget_oracle(scores, budget)
        assert compute <= budget + 1e-9
        assert agreement >= fit("graded", budget).outcome.agreement - 0.05  # different data, loose
        assert agreement >= simulate(scores, fit("graded", budget).thresholds).agreement
    assert script.budget_oracle(scores, 1.0)[0] == 1.0


def test_budget_curve_end_to_end(tmp_path):
    script = _load_script()
    graded(2000, 0).save(tmp_path / "calibration_scores.npz")
    graded(2000, 1).save(tmp_path / "heldout_scores.npz")
    assert script.main([str(tmp_path), "--budgets", "0.05", "0.4", "0.7", "1.0", "--targets", "0.9", "0.95"]) == 0
    out = tmp_path / "reports" / "budget"
    report = json.loads((out / "budget_curve.json").read_text())
    rows = {(r["method"], r.get("budget", r.get("target"))): r for r in report["rows"]}
    for budget in (0.4, 0.7):
        ours, rates_only, best = rows["budget", budget], rows["eero-rates-only", budget], rows["oracle", budget]
        assert abs(ours["compute"] - budget) <= 0.03 and ours["calibration_compute"] <= budget + 1e-9
        assert rates_only["compute"] <= budget + 0.03
        assert best["compute"] <= budget + 1e-9 and best["agreement"] >= ours["agreement"]
    assert ("budget", 0.05) not in rows and any("0.05 skipped" in n for n in report["notes"])
    assert report["oracle"]["agreement"] == 1.0 and report["heldout"]["tokens"] == 2000
    # threshold rows: fitted on calibration, so each reaches its target there, and a stricter
    # target buys held-out agreement with compute
    loose, strict = rows["threshold", 0.9], rows["threshold", 0.95]
    assert loose["calibration_agreement"] >= 0.9 and strict["calibration_agreement"] >= 0.95
    assert strict["agreement"] > loose["agreement"] and strict["compute"] > loose["compute"]
    # budget 1: the chain without early exits, the full model's output
    assert rows["budget", 1.0]["agreement"] == 1.0 and rows["budget", 1.0]["compute"] == pytest.approx(1.0)
    rng = report["range"]
    assert rng["cheapest"] == pytest.approx(graded(10, 0).costs()[0] / graded(10, 0).costs()[-1])
    assert rng["chain_compute"] == pytest.approx(1 + 9 * 0.02 / 30)
    floor = report["min_agreement"]
    assert floor["floor"] == 0.5 and rng["cheapest"] <= floor["budget"] <= 1.0
    table = (out / "budget_curve.md").read_text()
    assert "| budget (EERO + refinement) | budget 0.4 |" in table and "Range: feasible budgets" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "budget_curve.png").stat().st_size > 1000


def test_work_is_counted_per_kv_policy():
    """fill: a token costs the layers up to its exit; defer: every position runs every layer later."""
    s = ExitScores(np.array([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1]]), np.ones((3, 2), bool), np.arange(3), [10, 20], 30)
    th = [0.5, 0.5]
    fill, defer = simulate(s, th), simulate(s, th, kv_policy="defer")
    assert fill.layers == pytest.approx((10 + 20 + 30) / 3) and fill.compute == pytest.approx(60 / 90)
    assert defer.layers == 30 and defer.compute == pytest.approx(1.0)
    with pytest.raises(ValueError, match="KV policy"):
        simulate(s, th, kv_policy="copy")
