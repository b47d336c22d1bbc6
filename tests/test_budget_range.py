"""Budgets a user can reason about (issue 29): `lama calibrate --budget B` on scores shaped like
stories260K's and SmolLM2's. Budget 1 is the chain without early exits (the full model's output),
below the cheapest policy a budget is refused naming the range, a budget whose held-out agreement
falls below the floor is refused with that agreement, and a budget takes the cheaper check.

The SmolLM2 case is synthetic: no trained SmolLM2 checkpoint exists in this checkout, so its
scores are drawn with SmolLM2's shapes (30 layers, exits after 15, 21 and 24, a gate check of
0.048 layers: ~170k MACs over a 3.5M-MAC layer; the head check runs the 49,152-word LM head,
~8 layers). The stories260K case uses its real shapes and check costs (5 layers, exits 1-4, head
check 0.768 layers, gate 0.0466) with synthetic confidences; the real checkpoint's figures are in
benchmarks/results/stories260k/.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter import api
from exporter.budget import budget_for_agreement, budget_range, budget_thresholds
from exporter.checkpoint import CONFIG, CheckpointConfig, read_config, scores_file
from exporter.recipes import ModelSource
from exporter.scores import ExitScores, simulate
from runtime.manifest import to_json_thresholds
from runtime.policy import Policy

STORIES = dict(exit_layers=[1, 2, 3, 4], num_layers=5, head_cost=0.768, gate_cost=0.0466)
SMOL = dict(exit_layers=[15, 21, 24], num_layers=30, head_cost=8.0, gate_cost=0.048)


def shaped(shape: dict, n: int, seed: int, kind: str = "head") -> ExitScores:
    """Heads that agree more the deeper they sit; confidence informative but noisy."""
    rng = np.random.default_rng(seed)
    depth = np.asarray(shape["exit_layers"]) / shape["num_layers"]
    settle = rng.beta(2.0, 1.2, size=n)  # depth at which a token's answer settles
    agree = rng.random((n, depth.size)) < 0.05 + 0.93 / (1 + np.exp(-(depth[None] - settle[:, None]) / 0.06))
    z = 2.2 * (2 * agree - 1) + rng.normal(0, 1.0, agree.shape)
    cost = shape["head_cost"] if kind == "head" else shape["gate_cost"]
    return ExitScores(1 / (1 + np.exp(-z)), agree, np.arange(n) // 64, list(shape["exit_layers"]),
                      shape["num_layers"], check_cost=cost)


def fake_checkpoint(folder, shape: dict, confidence: str = "top1"):
    """A checkpoint folder with what `api.calibrate` reads: lama.json and the four score files
    (head and gate, calibration and held-out; the same tokens and agreements, as lama train writes)."""
    folder.mkdir()
    for split, seed in (("calibration", 0), ("heldout", 1)):
        head = shaped(shape, 6000, seed)
        head.save(folder / scores_file(split))
        gate = shaped(shape, 6000, seed)  # same agreements; the gate's score is its own draw
        rng = np.random.default_rng(seed + 100)
        gate.confidence = 1 / (1 + np.exp(-(2.5 * (2 * gate.agree - 1) + rng.normal(0, 1.0, gate.agree.shape))))
        gate.check_cost = shape["gate_cost"]
        gate.save(folder / scores_file(split, "gate"))
    cfg = CheckpointConfig(source=ModelSource("none"), exits=list(shape["exit_layers"]),
                           num_layers=shape["num_layers"], head="adapter", rank=4,
                           thresholds=to_json_thresholds([float("inf")] * len(shape["exit_layers"])),
                           policy=Policy("target", target=0.95, margin=0.03), confidence=confidence,
                           gate_width=32)
    (folder / CONFIG).write_text(cfg.to_json())
    return folder


# the range, in the scores alone ------------------------------------------------------------


@pytest.mark.parametrize("shape", [STORIES, SMOL], ids=["stories260k", "smollm2"])
@pytest.mark.parametrize("kind", ["head", "gate"])
def test_budget_one_is_the_full_model(shape, kind):
    """Budget 1 = the chain without early exits, checks included: every exit off, whatever the
    checks cost (stories260K's head checks make that chain 1.61x the plain model; before issue
    29, budget 1 there meant the plain model's compute and forced tokens out at layer ~1.8)."""
    cal, held = shaped(shape, 4000, 0, kind), shaped(shape, 4000, 1, kind)
    rng = budget_range(cal)
    e, layers = len(shape["exit_layers"]), shape["num_layers"]
    cost = shape["head_cost"] if kind == "head" else shape["gate_cost"]
    assert rng.chain_compute == pytest.approx(1 + e * cost / layers)
    assert rng.cheapest == pytest.approx((shape["exit_layers"][0] + cost) / (layers + e * cost))
    res = budget_thresholds(cal, 1.0)
    assert res.origin == "never" and np.all(np.isinf(res.thresholds))
    assert simulate(held, res.thresholds).agreement == 1.0
    # the same budget in the old unit (the plain model's compute) is what the chain costs / 1.61:
    old = budget_thresholds(cal, 1.0 / rng.chain_compute)
    if kind == "head" and shape is STORIES:  # forced out early: what issue 29 saw (greedy 0.036)
        assert simulate(held, old.thresholds).agreement < 0.9 and old.outcome.layers < 3.0


@pytest.mark.parametrize("shape", [STORIES, SMOL], ids=["stories260k", "smollm2"])
def test_below_the_range_is_refused_naming_it(shape):
    cal = shaped(shape, 2000, 0, "gate")
    rng = budget_range(cal)
    with pytest.raises(ValueError, match=rf"below the cheapest possible policy; feasible budgets under the fill KV "
                                         rf"policy: {rng.cheapest:.4f} .* to 1 \(no early exit"):
        budget_thresholds(cal, rng.cheapest - 0.01)
    assert budget_thresholds(cal, rng.cheapest).outcome.coverage[0] == 1.0  # the range's low end is feasible


def test_defer_counts_the_work_that_runs():
    """Under defer every skipped layer runs later: only the checks can be saved, so the range is
    narrow and a budget that saves work under fill is refused."""
    cal = shaped(SMOL, 2000, 0, "gate")
    defer = budget_range(cal, kv_policy="defer")
    assert defer.cheapest == pytest.approx((30 + 0.048) / (30 + 3 * 0.048)) and defer.never == 1.0
    with pytest.raises(ValueError, match=r"under the defer KV policy: 0\.99"):
        budget_thresholds(cal, 0.8, kv_policy="defer")
    assert budget_thresholds(cal, 0.8, kv_policy="fill").spent <= 0.8 + 1e-9


def test_budget_for_agreement_keeps_the_floor():
    cal, held = shaped(STORIES, 4000, 0, "gate"), shaped(STORIES, 4000, 1, "gate")
    need = budget_for_agreement(cal, 0.9, heldout=held)
    assert budget_range(cal).cheapest < need < 1.0
    th = budget_thresholds(cal, need).thresholds
    assert simulate(held, th).agreement >= 0.9
    lower = budget_thresholds(cal, need - 0.05).thresholds
    assert simulate(held, lower).agreement < 0.9  # the floor binds: less budget falls below it


# lama calibrate --budget ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [STORIES, SMOL], ids=["stories260k", "smollm2"])
def test_calibrate_budget_one_gives_the_full_model(tmp_path, shape):
    ckpt = fake_checkpoint(tmp_path / "ckpt", shape)
    reports = api.calibrate(ckpt, budget=1.0)
    cfg = read_config(ckpt)
    assert cfg.thresholds == to_json_thresholds([float("inf")] * len(shape["exit_layers"]))
    assert reports["heldout"].agreement == 1.0 and reports["calibration"].compute_fraction > 1.0
    assert cfg.policy.kind == "budget" and cfg.policy.kv_policy == "fill" and cfg.policy.margin == 0.03
    notes = " ".join(reports["calibration"].notes)
    assert "feasible budgets under the fill KV policy" in notes and "every exit is off" in notes
    assert "kv_policy='fill'" in notes  # the runtime runs defer unless told: said where it is decided


def test_calibrate_chooses_the_gate_where_the_head_costs_most_of_a_layer(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "ckpt", STORIES)
    reports = api.calibrate(ckpt, budget=0.8)
    assert read_config(ckpt).confidence == "gate"
    assert any("the gate (0.0466 layers per exit) instead of the head's top1 (0.768 layers" in n
               for n in reports["calibration"].notes)
    # the range reported is the gate's: the head's chain would cost 1.61x the plain model
    assert "1.037x the plain model's compute" in " ".join(reports["calibration"].notes)
    # asked for explicitly, the head stays (and budget 0.8 of its chain is refused by the floor or not: its range)
    ckpt2 = fake_checkpoint(tmp_path / "ckpt2", STORIES)
    api.calibrate(ckpt2, budget=1.0, confidence="top1")
    assert read_config(ckpt2).confidence == "top1"


def test_calibrate_refuses_below_the_range(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "ckpt", SMOL)
    before = (ckpt / CONFIG).read_text()
    with pytest.raises(ValueError, match=r"budget 0\.3 \(compute\) is below the cheapest possible policy; "
                                         r"feasible budgets under the fill KV policy: 0\.499"):
        api.calibrate(ckpt, budget=0.3)
    assert (ckpt / CONFIG).read_text() == before  # nothing written


def test_calibrate_refuses_a_budget_below_the_agreement_floor(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "ckpt", STORIES)
    held = ExitScores.load(ckpt / scores_file("heldout", "gate"))
    cal = ExitScores.load(ckpt / scores_file("calibration", "gate"))
    low = budget_range(cal).cheapest + 0.02
    would = simulate(held, budget_thresholds(cal, low).thresholds).agreement
    assert would < 0.5
    with pytest.raises(ValueError, match=rf"budget {low:g} would give held-out agreement {would:.3f} with the full "
                                         r"model .* below the floor 0\.5 .* a budget of about 0\.\d+ or more keeps it"):
        api.calibrate(ckpt, budget=low)
    assert read_config(ckpt).policy.kind == "target"  # refused: nothing written
    reports = api.calibrate(ckpt, budget=low, min_agreement=0.0)  # accepted when asked
    assert reports["heldout"].agreement == pytest.approx(would)
    with pytest.raises(ValueError, match="min_agreement must be in"):
        api.calibrate(ckpt, budget=0.9, min_agreement=1.5)


def test_reports_count_work_under_the_kv_policy(tmp_path):
    """Issue 26 item 4: 'saved X%' was counted for fill while the runtime runs defer."""
    ckpt = fake_checkpoint(tmp_path / "ckpt", SMOL, confidence="gate")
    defer = api.calibrate(ckpt, target=0.9)  # a target's default: the runtime's, defer
    assert read_config(ckpt).policy.kv_policy == "defer"
    r = defer["heldout"]
    assert r.kv_policy == "defer" and r.layers_fraction == 1.0 and r.decided_fraction < 0.95
    assert "work under the defer KV policy 1.000" in r.table() and "not work" in r.table()
    fill = api.calibrate(ckpt, target=0.9, kv_policy="fill")["heldout"]
    assert fill.layers_fraction == pytest.approx(fill.decided_fraction) and fill.layers_fraction < 0.95
    stored = json.loads((ckpt / CONFIG).read_text())["calibration"]["heldout"]
    assert stored["kv_policy"] == "fill"
    budget = api.calibrate(ckpt, budget=0.998, kv_policy="defer", min_agreement=0.0)  # within defer's range
    assert read_config(ckpt).policy.kv_policy == "defer" and budget["calibration"].layers_fraction == 1.0


def test_cli_prints_the_range_and_refuses_in_one_line(tmp_path, capsys):
    from lama.cli import main

    ckpt = fake_checkpoint(tmp_path / "ckpt", SMOL, confidence="gate")
    assert main(["calibrate", str(ckpt), "--budget", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "note: feasible budgets under the fill KV policy: 0.499" in out and "every exit is off" in out
    assert main(["calibrate", str(ckpt), "--budget", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "below the cheapest possible policy" in err and "Traceback" not in err
    assert main(["calibrate", str(ckpt), "--budget", "0.97", "--kv-policy", "defer", "--min-agreement", "0"]) == 2
    assert "under the defer KV policy" in capsys.readouterr().err


def test_export_at_budget_one_generates_the_full_models_tokens(tmp_path):
    """End to end on a tiny model: budget 1 -> the manifest's thresholds are all 'never' and
    greedy generation equals the full model's (the chain's thresholds="never"); a budget in the
    range exits (so the test could fail)."""
    from conftest import make_checkpoint
    from runtime import Runtime

    ckpt, bb = make_checkpoint(tmp_path, "llama")
    cal = read_scores_kind(ckpt)
    low = budget_range(cal).cheapest + 0.05
    api.calibrate(ckpt, budget=low, min_agreement=0.0)
    assert any(np.isfinite(t) for t in read_config(ckpt).thresholds if t is not None)
    api.calibrate(ckpt, budget=1.0)
    folder = api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    with pytest.warns(UserWarning, match="fill KV policy"):  # budgets are fitted for fill, the default runs defer
        Runtime.load(folder)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.load(folder, kv_policy="fill")  # the policy it was fitted for: no warning
    rt = Runtime.load(folder, kv_policy="fill")
    assert rt.manifest.calibration.policy["kind"] == "budget" and rt.manifest.calibration.policy["budget"] == 1.0
    assert all(not np.isfinite(t) for t in rt.resolve_thresholds(None))
    prompt = "It is a truth universally"
    full = list(rt.generate(prompt, 16, thresholds="never").tokens)
    ours = rt.generate(prompt, 16)
    assert list(ours.tokens) == full and ours.work()["share"] == 1.0


def read_scores_kind(ckpt):
    from exporter.checkpoint import read_scores

    return read_scores(ckpt)


def test_policy_warns_when_a_budget_runs_under_another_kv_policy():
    fill = Policy("budget", budget=0.6, kv_policy="fill")
    assert fill.kv_warning("fill") is None
    assert "work stays at the full model's" in fill.kv_warning("defer") and "kv_policy='fill'" in fill.kv_warning("defer")
    assert "counted for the defer KV policy" in Policy("budget", budget=0.99, kv_policy="defer").kv_warning("fill")
    assert Policy("target", target=0.9, kv_policy="fill").kv_warning("defer") is None
