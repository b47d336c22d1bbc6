"""Sigmoid + Mul (transformers' SiLU, as traced) -> one QuickGelu(alpha=1): the same numbers."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from exporter.fuse_activations import fuse_silu


def _graph(order_swapped: bool = False, sigmoid_also_read: bool = False):
    mul_in = ["s", "x"] if order_swapped else ["x", "s"]
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="/act/Sigmoid"),
             helper.make_node("Mul", mul_in, ["y"], name="/act/Mul"),
             helper.make_node("Mul", ["y", "u"], ["z"], name="/mlp/Mul")]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, None, 64])]
    if sigmoid_also_read:
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, None, 64]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, None, 64])
                                       for n in ("x", "u")], outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_silu_becomes_one_quickgelu_with_identical_outputs():
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.normal(size=(1, 5, 64)) * 4).astype(np.float32), "u": rng.normal(size=(1, 5, 64)).astype(np.float32)}
    for swapped in (False, True):
        model = _graph(swapped)
        before = _run(model, feeds)[0]
        assert fuse_silu(model) == 1
        onnx.checker.check_model(model)
        ops = [n.op_type for n in model.graph.node]
        assert ops == ["QuickGelu", "Mul"]
        assert [a.f for a in model.graph.node[0].attribute if a.name == "alpha"] == [1.0]
        np.testing.assert_array_equal(_run(model, feeds)[0], before)  # bit for bit


def test_a_sigmoid_read_elsewhere_stays():
    model = _graph(sigmoid_also_read=True)
    assert fuse_silu(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Sigmoid", "Mul", "Mul"]
