"""fp16 and fp32 exports of head and gate checkpoints: they export, run, leave the caller's
model alone, and the runtime's confidence is the calibration score for the same tokens."""

import numpy as np
import pytest
import torch
from conftest import make_checkpoint

from exporter import api
from exporter.checkpoint import load_gates, load_heads, read_config
from exporter.data import Windows
from exporter.train import cache_features, exit_scores
from runtime import Runtime

EXITS = (1, 2, 3)
TOL = {"fp32": 1e-5, "fp16": 1e-3}
TOKENS = [40, 72, 73, 83, 0, 73, 83, 0, 65, 0, 84, 82, 85, 84, 72, 0, 85, 78]  # any ids < 95


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{confidence: (checkpoint, fp32 backbone)} on the tiny llama: plain heads and gates."""
    out = {}
    for kind, gates in (("top1", False), ("gate", True)):
        d = tmp_path_factory.mktemp(kind)
        out[kind] = make_checkpoint(d, "llama", EXITS, gates=gates)
    return out


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """{(confidence, precision): export folder}, each exported from the caller's fp32 backbone."""
    out = {}
    for kind, (ckpt, bb) in checkpoints.items():
        for precision in TOL:
            d = tmp_path_factory.mktemp(f"{kind}_{precision}")
            out[kind, precision] = api.export(ckpt, out=d / "onnx", precision=precision, backbone=bb)
    return out


@pytest.mark.parametrize("kind", ["top1", "gate"])
def test_fp16_export_runs_and_leaves_the_callers_model_alone(checkpoints, exports, kind):
    _, bb = checkpoints[kind]
    # export cast a copy, not the caller's model (it used to be left in fp16)
    assert {p.dtype for p in bb.model.parameters()} == {torch.float32}
    rt = Runtime.load(exports[kind, "fp16"])
    assert rt.manifest.precision == "fp16"
    assert rt.manifest.segments[0].exit.confidence == kind
    ref = Runtime.load(exports[kind, "fp32"])
    for thresholds in ("never", [0.0, 0.0, 0.0]):
        a = rt.generate(TOKENS[:6], 10, thresholds=thresholds, stop_at_eos=False)
        b = ref.generate(TOKENS[:6], 10, thresholds=thresholds, stop_at_eos=False)
        assert len(a.tokens) == 10
        assert {r.segment for r in a.records} == {r.segment for r in b.records}
        # fp16 rounding may flip a near-tie in a random model, not most tokens
        assert np.mean(np.array(a.tokens) == np.array(b.tokens)) >= 0.8


def calibration_scores(ckpt, bb, kind: str) -> np.ndarray:
    """(T, E) confidences exactly as `lama train` computes them for calibration, on TOKENS."""
    cfg = read_config(ckpt)
    heads = load_heads(ckpt, bb, cfg)
    feats = cache_features(bb, Windows(np.array([TOKENS])), list(cfg.exits))
    gates = load_gates(ckpt, bb, cfg) if kind == "gate" else None
    return exit_scores(bb, heads, feats, kind, gates).confidence


def runtime_scores(rt: Runtime) -> np.ndarray:
    """(T, E) exit k's confidence at every position, teacher-forcing TOKENS one at a time and
    leaving at exit k (its confidence depends only on the layers before it, all computed)."""
    n = len(rt.manifest.exits)
    out = np.zeros((len(TOKENS), n))
    for k in range(n):
        th = [float("inf")] * n
        th[k] = 0.0
        cache = rt.new_cache()
        for i, t in enumerate(TOKENS):
            _, j, conf, _ = rt.step(np.array([t]), cache, th)
            assert j == k
            out[i, k] = conf
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["top1", "gate"])
def test_runtime_confidence_is_the_calibration_score(checkpoints, exports, kind, precision):
    ckpt, bb = checkpoints[kind]
    want = calibration_scores(ckpt, bb, kind)
    got = runtime_scores(Runtime.load(exports[kind, precision]))
    assert want.std() > 1e-3  # the scores vary, so agreement is not trivial
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[precision])
