"""The per-target threshold table an export ships: it keeps a calibration's guarantee, and a
checkpoint without calibration scores is refused rather than shipped with an empty table."""

import shutil

import numpy as np
import pytest
from conftest import make_checkpoint

from exporter import api
from exporter.calibrate import calibrate_thresholds
from exporter.checkpoint import read_config, read_scores, scores_file
from runtime.manifest import to_json_thresholds
from exporter.onnx_export import TARGETS
from exporter.scores import ExitScores
from runtime import Runtime


def informative_scores(n=20000, seed=0) -> ExitScores:
    """Enough tokens that guarantee-mode thresholds are finite and differ from plain ones."""
    rng = np.random.default_rng(seed)
    conf = np.stack([rng.beta(1 + k, 2, size=n) for k in range(3)], axis=1)
    return ExitScores(conf, rng.random(conf.shape) < conf, np.arange(n) // 25, [1, 2, 3], 4)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    ckpt, bb = make_checkpoint(tmp_path_factory.mktemp("table"), "llama")
    informative_scores().save(ckpt / scores_file("calibration"))
    return ckpt, bb


@pytest.fixture
def checkpoint(base_checkpoint, tmp_path):
    """A private copy: the tests recalibrate it (rewriting lama.json) or delete files."""
    ckpt, bb = base_checkpoint
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt", bb


def test_table_keeps_the_guarantee(checkpoint, tmp_path):
    ckpt, bb = checkpoint
    api.calibrate(ckpt, target=0.9, delta=0.1)
    m = Runtime.load(api.export(ckpt, out=tmp_path / "onnx", backbone=bb)).manifest
    calib = read_scores(ckpt)
    assert m.calibration.by_target_delta == 0.1
    assert sorted(m.calibration.by_target) == sorted(f"{t:g}" for t in TARGETS)
    for t in TARGETS:
        safe = to_json_thresholds(calibrate_thresholds(calib, t, delta=0.1))
        assert m.thresholds_for(t) == safe
    # the table really differs from plain calibration (else this test could not fail)
    assert m.thresholds_for(0.9) != to_json_thresholds(calibrate_thresholds(calib, 0.9))
    # the default thresholds are the guarantee-mode ones of the calibrated target, as the table says
    assert list(m.calibration.thresholds) == m.thresholds_for(0.9)


def test_plain_calibration_gives_a_plain_table(checkpoint, tmp_path):
    ckpt, bb = checkpoint
    api.calibrate(ckpt, target=0.9)
    m = Runtime.load(api.export(ckpt, out=tmp_path / "onnx", backbone=bb)).manifest
    assert m.calibration.by_target_delta is None
    assert m.thresholds_for(0.95) == to_json_thresholds(calibrate_thresholds(read_scores(ckpt), 0.95))


def test_missing_calibration_scores_are_refused(checkpoint, tmp_path):
    ckpt, bb = checkpoint
    (ckpt / scores_file("calibration")).unlink()
    with pytest.raises(FileNotFoundError, match="per-target threshold table.*calibration_scores.npz is missing"):
        api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    assert not (tmp_path / "onnx").exists()


def test_margin_is_kept_by_the_checkpoint_and_the_table(checkpoint, tmp_path):
    """A calibration margin fits every threshold at target + margin: in lama.json, the default
    thresholds, the per-target table, and a later recalibration that does not name it."""
    ckpt, bb = checkpoint
    calib = read_scores(ckpt)
    api.calibrate(ckpt, target=0.9, margin=0.03)
    strict = to_json_thresholds(calibrate_thresholds(calib, 0.93))
    assert strict != to_json_thresholds(calibrate_thresholds(calib, 0.9))  # else this test could not fail
    m = Runtime.load(api.export(ckpt, out=tmp_path / "onnx", backbone=bb)).manifest
    assert list(m.calibration.thresholds) == strict
    assert m.thresholds_for(0.95) == to_json_thresholds(calibrate_thresholds(calib, 0.98))
    api.calibrate(ckpt, target=0.9)  # keeps the checkpoint's margin
    assert to_json_thresholds(calibrate_thresholds(calib, 0.9, margin=0.03)) == strict
    assert read_config(ckpt).thresholds == strict and read_config(ckpt).policy.margin == 0.03
    with pytest.raises(ValueError, match="margin"):
        api.calibrate(ckpt, target=0.9, margin=1.5)


def test_a_budget_calibration_keeps_the_margin(checkpoint, tmp_path):
    """target + margin, then a budget, then a target again: the margin survives the budget (in
    lama.json, the export's per-target table under the budget policy, the next calibration)."""
    ckpt, bb = checkpoint
    calib = read_scores(ckpt)
    api.calibrate(ckpt, target=0.9, margin=0.03)
    api.calibrate(ckpt, budget=0.7)
    policy = read_config(ckpt).policy
    assert (policy.kind, policy.budget, policy.margin, policy.delta) == ("budget", 0.7, 0.03, None)
    m = Runtime.load(api.export(ckpt, out=tmp_path / "onnx", backbone=bb)).manifest
    assert m.calibration.policy["kind"] == "budget" and m.calibration.by_target_delta is None
    for t in TARGETS:  # each row fitted at t + 0.03, as under the target policy
        assert m.thresholds_for(t) == to_json_thresholds(calibrate_thresholds(calib, t, margin=0.03))
    assert m.thresholds_for(0.9) != to_json_thresholds(calibrate_thresholds(calib, 0.9))  # else it could not fail
    api.calibrate(ckpt, target=0.9)  # names no margin: the checkpoint's 0.03, kept through the budget
    c = read_config(ckpt)
    assert c.policy.margin == 0.03 and c.thresholds == to_json_thresholds(calibrate_thresholds(calib, 0.93))
