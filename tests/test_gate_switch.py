"""The gate switch (exporter/gate_switch.py): a gated segment's gate under an `If` on `gate_on`.

Gate on, the switched graph gives the unswitched graph's outputs; gate off, the confidence is
-inf, the head's input zeros, and every other output the same. The runtime feeds gate_on =
(threshold < +inf), so generation gives the same tokens, exits and confidences as an export
without the switch, at any thresholds, in both KV layouts and both KV policies, in exact mode
with drafts, greedy and sampled; exports without the role run unchanged.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import make_checkpoint

from exporter import onnx_export
from runtime import Runtime, roles as R

CAPACITY = 64
THRESHOLDS = [0.5] * 3  # the tiny gates' scores: some tokens leave at each exit, some run the whole model
NEVER = math.inf


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(layout, precision) -> (switched export, the same without the switch)."""
    d = tmp_path_factory.mktemp("gate_switch")
    ckpt, bb = make_checkpoint(d, "llama_hd16", gates=True, thresholds=THRESHOLDS)
    out = {}
    for kv, precision in (("buffer", "fp32"), ("concat", "fp32"), ("buffer", "int4")):
        kw = dict(backbone=bb, kv=kv, kv_capacity=CAPACITY if kv == "buffer" else None, precision=precision)
        out[kv, precision] = tuple(onnx_export.export(ckpt, d / f"{kv}-{precision}-{s}", gate_switch=s, **kw)
                                   for s in (True, False))
    return out


def _feeds(seg, batch: int = 2, seq: int = 3, past: int = 4, hidden: int = 64, seed: int = 0) -> dict:
    """Random inputs of one segment call by role: `batch` rows, `seq` new positions after `past`."""
    rng = np.random.default_rng(seed)
    total, feeds = past + seq, {}
    for t in seg.inputs:
        if t.role == R.INPUT_IDS:
            v = rng.integers(0, 97, (batch, seq))
        elif t.role == R.HIDDEN:
            v = rng.standard_normal((batch, seq, hidden))
        elif t.role == R.ATTENTION_MASK:
            v = np.ones((batch, total))
        elif t.role == R.POSITION_IDS:
            v = np.tile(np.arange(past, total), (batch, 1))
        elif t.role == R.SEQLENS_K:
            v = np.full((batch,), total - 1)
        elif t.role == R.TOTAL_SEQUENCE_LENGTH:
            v = np.array(total)
        elif t.role in R.PAST:
            v = rng.standard_normal((batch, t.shape[1], CAPACITY if t.shape[2] == "capacity" else past, t.shape[3]))
        else:
            continue  # gate_on: the caller's
        feeds[t.name] = np.asarray(v).astype(t.dtype)
    return feeds


def _session(folder, seg):
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / seg.file), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("key", [("buffer", "fp32"), ("concat", "fp32"), ("buffer", "int4")])
def test_switched_graph_outputs(exports, key):
    switched, plain = exports[key]
    ms, mp = Runtime.load(switched).manifest, Runtime.load(plain).manifest
    gated = [j for j, s in enumerate(mp.segments) if s.exit is not None]
    assert gated
    for j in gated:
        s, p = ms.segments[j], mp.segments[j]
        a, b = _session(switched, s), _session(plain, p)
        names = [o.name for o in b.get_outputs()]
        assert [o.name for o in a.get_outputs()] == names
        conf, exit_hidden = p.name(R.CONFIDENCE), p.name(R.EXIT_HIDDEN)
        # two rows at one position (decode), one row at three (GroupQueryAttention takes no more)
        for (batch, seq), on in itertools.product(((2, 1), (1, 3)), (True, False)):
            feeds = _feeds(p, batch, seq)
            want = dict(zip(names, b.run(None, feeds)))
            got = dict(zip(names, a.run(None, {**feeds, s.name(R.GATE_ON): np.array(on)})))
            assert want[conf].shape == (batch,)
            for n in names:
                assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, (j, on, n)
                if n not in (conf, exit_hidden):
                    assert np.array_equal(got[n], want[n]), (j, on, n)  # not one bit moved
            if on:
                np.testing.assert_allclose(got[conf], want[conf], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got[exit_hidden], want[exit_hidden], rtol=1e-5, atol=1e-5)
            else:
                assert np.all(got[conf] == -np.inf) and not np.any(got[exit_hidden])


def test_manifest_and_graphs(exports):
    import onnx

    switched, plain = exports["buffer", "fp32"]
    ms, mp = Runtime.load(switched).manifest, Runtime.load(plain).manifest
    for s, p in zip(ms.segments, mp.segments):
        assert p.input(R.GATE_ON) is None
        spec = s.input(R.GATE_ON)
        if s.exit is None:  # the last segment has no gate
            assert spec is None and s.inputs == p.inputs
            continue
        assert (spec.dtype, spec.shape, spec.layer) == ("bool", (), None)
        assert [t for t in s.inputs if t.role != R.GATE_ON] == list(p.inputs)
        assert s.outputs == p.outputs
        g = onnx.load(str(switched / s.file)).graph
        ifs = [n for n in g.node if n.op_type == "If"]
        assert len(ifs) == 1 and ifs[0].input[0] == spec.name
        assert len(g.node) < len(onnx.load(str(plain / p.file)).graph.node) - 10  # the gate went under the If


def test_switched_by_default_only_where_tensorrt_cannot_build(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16", gates=True)
    for kv, on in (("buffer", True), ("concat", False)):  # a concat fp32 export may become TensorRT engines
        folder = onnx_export.export(ckpt, tmp_path / kv, backbone=bb, kv=kv)
        assert (Runtime.load(folder).manifest.segments[0].input(R.GATE_ON) is not None) == on


def test_tensorrt_builds_refuse_the_switch(tmp_path):
    with pytest.raises(ValueError, match="TensorRT"):
        onnx_export.export(tmp_path / "no-checkpoint", tmp_path / "out", backend="tensorrt", precision="fp16",
                           gate_switch=True)


class Draft:
    name = "fixed"

    def propose(self, history, k):
        return [history[-1], 7, 11][:k]


def _runs(folder, kv_policy):
    """Generations through every path of a step: (tokens, exits, confidences) of each."""
    rt = Runtime.load(folder, kv_policy=kv_policy)
    runs = [dict(thresholds=THRESHOLDS), dict(thresholds=None), dict(thresholds="never"),
            dict(thresholds=[NEVER, 0.5, 0.4]),
            dict(thresholds=[0.0] * 3), dict(thresholds=0.9)]
    if kv_policy == "defer":  # exact mode: drafts checked in one call, greedy and sampled
        runs += [dict(thresholds=None, exact=True, drafts=[Draft()]),
                 dict(thresholds=None, exact=True, drafts=[Draft()], temperature=0.9, seed=3)]
    out = []
    for kw in runs:
        r = rt.generate("It is a truth", 16, stop_at_eos=False, **kw)
        out.append((r.tokens, [x.segment for x in r.records], [x.confidence for x in r.records]))
    return out


@pytest.mark.parametrize("key", [("buffer", "fp32"), ("concat", "fp32"), ("buffer", "int4")])
@pytest.mark.parametrize("kv_policy", ["defer", "fill"])
def test_generation_is_unchanged(exports, key, kv_policy):
    switched, plain = exports[key]
    got, want = _runs(switched, kv_policy), _runs(plain, kv_policy)
    for (t, e, c), (t0, e0, c0) in zip(got, want):
        assert t == t0 and e == e0
        np.testing.assert_allclose(c, c0, rtol=1e-5, atol=1e-6)
    exits = set(want[0][1])
    assert len(exits) > 1 and 3 in exits  # tokens leave early, and some run the whole model


class GateLog:
    """Records the gate_on each segment call was given (None: none)."""

    def __init__(self, backend, j, seg, log):
        self.backend, self.j, self.log, self.input_names = backend, j, log, backend.input_names
        self.name = seg.names.get(R.GATE_ON)

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _record(self, feeds):
        self.log.append((self.j, None if self.name is None else bool(feeds[self.name])))

    def run(self, feeds):
        self._record(feeds)
        return self.backend.run(feeds)

    def run_bound(self, binding, feeds):
        self._record(feeds)
        return self.backend.run_bound(binding, feeds)


@pytest.mark.parametrize("layout", ["buffer", "concat"])
def test_gate_on_follows_the_threshold(exports, layout):
    switched, plain = exports[layout, "fp32"]
    for folder in (switched, plain):
        rt = Runtime.load(folder)
        log = []
        rt.backends = [GateLog(b, j, s, log) for j, (b, s) in enumerate(zip(rt.backends, rt.manifest.segments))]
        rt.generate("It is a truth", 12, thresholds=[NEVER, 0.0, NEVER], stop_at_eos=False)
        if folder == plain:
            assert all(on is None for _, on in log)  # an export without the role: nothing fed
            continue
        by_seg = {}
        for j, on in log:
            by_seg.setdefault(j, set()).add(on)
        # segment 1's exit fires at threshold 0: the tokens after the prompt leave there, and
        # their deferred positions reach segment 2 in flushes, whose gate nobody reads
        assert by_seg == {0: {False}, 1: {True}, 2: {False}, 3: {None}}


def test_shared_nodes_stay_outside():
    """A hand-made graph: Relu feeds the hidden state and the gate, so it stays outside the If;
    the gate's own nodes (and the weight only they read) move into it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporter.gate_switch import switch_gate
    from runtime.manifest import TensorSpec

    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "gate_w")
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("Identity", ["h"], ["hidden_out"]),
             helper.make_node("MatMul", ["h", "gate_w"], ["z"]),
             helper.make_node("ReduceMax", ["z"], ["confidence"], axes=[1], keepdims=0),
             helper.make_node("Neg", ["h"], ["exit_hidden"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", 4])],
                          [helper.make_tensor_value_info(n, f, s) for n, s in
                           (("hidden_out", ["batch", 4]), ("confidence", ["batch"]), ("exit_hidden", ["batch", 4]))],
                          initializer=[w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    switched = [TensorSpec(R.CONFIDENCE, "confidence", "float32", ("batch",)),
                TensorSpec(R.EXIT_HIDDEN, "exit_hidden", "float32", ("batch", 4))]
    gate_on = TensorSpec(R.GATE_ON, "on", "bool", ())
    assert switch_gate(model, switched, gate_on, {R.CONFIDENCE: -np.inf, R.EXIT_HIDDEN: 0.0}) == 3
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Identity", "If"] and not model.graph.initializer
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1, -2, 3, -4], [0.5, 1, 1, 1]], np.float32)
    for on in (True, False):
        hidden, conf, exit_hidden = s.run(["hidden_out", "confidence", "exit_hidden"], {"x": x, "on": np.array(on)})
        assert np.array_equal(hidden, np.maximum(x, 0))
        assert np.allclose(conf, np.maximum(x, 0).sum(1) * 0.5 if on else -np.inf)
        assert np.array_equal(exit_hidden, -np.maximum(x, 0) if on else np.zeros_like(x))
    # a score the rest of the graph reads too: nothing to switch, the graph unchanged
    g2 = helper.make_graph([helper.make_node("Relu", ["x"], ["confidence"]),
                            helper.make_node("Neg", ["confidence"], ["hidden_out"])], "g2",
                           [helper.make_tensor_value_info("x", f, ["batch"])],
                           [helper.make_tensor_value_info(n, f, ["batch"]) for n in ("confidence", "hidden_out")])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)])
    before = m2.SerializeToString()
    assert switch_gate(m2, switched[:1], gate_on, {R.CONFIDENCE: -np.inf}) == 0
    assert m2.SerializeToString() == before
