"""SiLU as one onnxruntime node: `x * sigmoid(x)` becomes `com.microsoft::QuickGelu(alpha=1)`.

Why: transformers' SiLU traces into a Sigmoid and a Mul, two kernel calls per MLP per token;
on a 2-core CPU each small node costs several microseconds of onnxruntime's executor, which is
a visible share of a step at this model size (../shared/KNOWN.md). QuickGelu computes
`x * sigmoid(alpha * x)` in one kernel with the same logistic routine, so with alpha = 1 it is
SiLU, to the bit (tests/test_fuse_activations.py compares the two graphs' outputs). Applied to
the int8/int4 graphs, which already hold onnxruntime's contrib ops (MatMulNBits); the fp32/fp16
graphs stay plain ONNX for every backend.
"""

from __future__ import annotations

DOMAIN = "com.microsoft"


def _reads(graph):
    """Every tensor name a node of `graph` reads, subgraphs (an If's branches) included: a
    branch may read a value of the graph around it."""
    from onnx import AttributeProto

    for node in graph.node:
        yield from node.input
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _reads(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _reads(sub)


def fuse_silu(model) -> int:
    """Rewrite, in place, each `Mul(x, Sigmoid(x))` (either input order) whose Sigmoid feeds only
    that Mul into one QuickGelu(alpha=1). Returns the number of pairs fused."""
    from onnx import helper

    g = model.graph
    readers: dict[str, int] = {}
    for name in _reads(g):
        readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    nodes = list(g.node)  # by index: protobuf may hand out a new wrapper object on each access
    sigmoid_at = {n.output[0]: i for i, n in enumerate(nodes) if n.op_type == "Sigmoid" and len(n.input) == 1}
    drop, replace = set(), {}
    for i, node in enumerate(nodes):
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for s_out, x in (tuple(node.input), tuple(node.input)[::-1]):
            j = sigmoid_at.get(s_out)
            if j is None or nodes[j].input[0] != x or readers.get(s_out) != 1 or s_out in outputs:
                continue
            replace[i] = helper.make_node("QuickGelu", [x], list(node.output), name=node.name + "_quickgelu",
                                          domain=DOMAIN, alpha=1.0)
            drop.add(j)
            break
    if not replace:
        return 0
    nodes = [replace.get(i, n) for i, n in enumerate(nodes) if i not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(replace)
