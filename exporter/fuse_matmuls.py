"""Weight MatMuls that read the same input become one MatMul and a Split.

A decoder layer multiplies its normed input by q, k and v, and (after attention) its MLP input
by gate and up: five products from two inputs. At one token per step each product is a
small kernel call, and on a small CPU onnxruntime's cost per op (~5-8 us here, more once the
products are 4-bit) is a large share of a step; one MatMul over the concatenated weights and
a Split does the same arithmetic in fewer ops. Columns are independent, so the result is
identical, and so is the block quantization that follows (blocks run down each column).
"""

from __future__ import annotations

import numpy as np


def initializers_and_users(graph) -> tuple[dict, dict[str, int]]:
    """{name: initializer} and {tensor name: how many node inputs read it}: what a rewrite needs
    to drop a weight once its last reader is gone."""
    users: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    return {t.name: t for t in graph.initializer}, users


def fuse_shared_input_matmuls(model, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Fuse, in place, each group of >= 2 MatMuls with the same input and constant 2-D float32
    weights of the same input size (nodes named with `exclude_prefixes` stay apart). Returns
    the number of groups fused."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits, users = initializers_and_users(g)
    groups: dict[tuple[str, int], list] = {}
    for node in g.node:
        if (node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits
                and not node.name.startswith(exclude_prefixes)):
            t = inits[node.input[1]]
            if len(t.dims) == 2 and t.data_type == 1:  # FLOAT
                groups.setdefault((node.input[0], t.dims[0]), []).append(node)
    fused = {id(n): key for key, nodes in groups.items() if len(nodes) > 1 for n in nodes}
    out, done, new_inits = [], set(), []
    for node in g.node:
        key = fused.get(id(node))
        if key is None:
            out.append(node)
            continue
        if key in done:
            continue
        done.add(key)
        nodes = groups[key]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        base = "/fused/" + nodes[0].name.strip("/").replace("/", "_")
        new_inits += [numpy_helper.from_array(np.concatenate(weights, axis=1), base + "_W"),
                      numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), base + "_sizes")]
        out.append(helper.make_node("MatMul", [key[0], base + "_W"], [base + "_out"], name=base + "/MatMul"))
        out.append(helper.make_node("Split", [base + "_out", base + "_sizes"], [n.output[0] for n in nodes],
                                    name=base + "/Split", axis=-1))
        for n in nodes:
            users[n.input[1]] -= 1
            if users[n.input[1]] == 0:
                g.initializer.remove(inits.pop(n.input[1]))
    del g.node[:]
    g.node.extend(out)
    g.initializer.extend(new_inits)
    return len(done)


def pack_qkv_into_attention(model) -> int:
    """Hand each GroupQueryAttention its q|k|v product whole, in place: where a Split's three
    outputs are exactly the op's query, key and value inputs (in that order) and nothing else
    reads them, the op takes the Split's input as packed QKV (its documented form, key and
    value left empty) and the Split goes. The arithmetic is unchanged; one node and one copy
    of the projections per layer go away. Returns the number of attention nodes rewired."""
    g = model.graph
    readers: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    splits = {n.output[0]: n for n in g.node if n.op_type == "Split" and len(n.output) == 3}
    drop = set()
    for node in g.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 3:
            continue
        split = splits.get(node.input[0])
        if (split is None or list(split.output) != list(node.input[:3])
                or any(readers.get(o, 0) != 1 for o in split.output)):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        drop.add(id(split))
    if drop:
        kept = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(kept)
    return len(drop)
