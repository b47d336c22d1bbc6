"""Threshold calibration on synthetic scores where the right answer is known."""

import numpy as np
import pytest

from exporter.calibrate import calibrate_thresholds, report
from exporter.scores import ExitScores, oracle, simulate


def synthetic(n=20000, exits=(2, 4, 6), layers=8, seed=0):
    """Confidence is informative: P(agree | c) = c, deeper exits more confident."""
    rng = np.random.default_rng(seed)
    conf = np.stack([rng.beta(1 + k, 2, size=n) for k in range(len(exits))], axis=1)
    agree = rng.random(conf.shape) < conf
    return ExitScores(conf, agree, np.arange(n) // 50, list(exits), layers)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99])
def test_meets_target_on_calibration_set(target):
    s = synthetic()
    t = calibrate_thresholds(s, target)
    out = simulate(s, t)
    assert out.agreement >= target
    for a, c in zip(out.exit_agreement, out.coverage):
        assert c == 0 or a >= target
    assert out.layers < s.num_layers  # something does exit


def test_loosest_threshold_is_chosen():
    s = synthetic()
    t = calibrate_thresholds(s, 0.9)
    # loosening the first threshold a little breaks the target among that exit's leavers
    looser = list(t)
    looser[0] = np.nextafter(np.max(s.confidence[:, 0][s.confidence[:, 0] < t[0]]), -1)
    assert simulate(s, looser).exit_agreement[0] < 0.9


def test_guarantee_mode_is_stricter_and_holds_on_fresh_data():
    s = synthetic(seed=1)
    raw = calibrate_thresholds(s, 0.9)
    safe = calibrate_thresholds(s, 0.9, delta=0.05)
    assert all(b >= a for a, b in zip(raw, safe))
    fresh = synthetic(seed=2)
    assert simulate(fresh, safe).agreement >= 0.9


def test_unreachable_target_never_exits():
    s = synthetic()
    s.agree[:] = False
    assert calibrate_thresholds(s, 0.95) == [float("inf")] * 3
    assert simulate(s, [float("inf")] * 3).agreement == 1.0


def test_oracle_and_report():
    s = synthetic()
    o = oracle(s)
    assert o.agreement == 1.0 and o.layers <= simulate(s, calibrate_thresholds(s, 0.9)).layers
    r = report(s, calibrate_thresholds(s, 0.95), "calibration", 0.95)
    assert r.agreement >= 0.95 and 0 < r.layers_fraction < 1
    assert "exit after layer" in r.table()


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01])
def test_target_outside_unit_interval(target):
    with pytest.raises(ValueError, match=r"target agreement must be in \(0, 1\]"):
        calibrate_thresholds(synthetic(n=100), target)
