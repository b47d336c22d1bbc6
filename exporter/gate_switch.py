"""The exit gate behind a switch: its nodes run only when the runtime asks for them.

onnxruntime runs every node of a graph on every call, whether or not anyone fetches the
output they feed. A gated segment's gate (its score `confidence`, and the exit head's input
`exit_hidden`, read only when the score passes) is ~100 small nodes that SmolLM2's chain
paid on every call even with exits off, ~4% of a step
(benchmarks/results/smollm2-135m/chain-overhead). This pass, run on every gated segment at
export (`onnx_export.export`), moves the nodes that feed *only* those outputs into the
then-branch of one `If` whose condition is a new bool scalar input (role `gate_on`); the
else-branch gives the same shapes filled with a value no threshold passes (-inf for the
score) and zeros for the head's input, which the runtime never reads then. Nodes that also
feed another output (hidden states, K/V) stay outside; the branch reads them, and the
graph's inputs, from the outer scope. Weights only the gate reads move into the branch, so
onnxruntime folds and fuses them there as it did before.

The runtime feeds gate_on = (the exit's threshold < +inf) where the manifest lists the role
(runtime/chain.py); an export without it runs as before. Gate on: the same nodes compute the
same values (tests/test_gate_switch.py). By default the pass runs only on graphs that
onnxruntime alone can run (KV layout buffer, int8/int4 weights): TensorRT builds, and the
concat fp32/fp16 graphs engines may be built from on a device later, keep their gates as they
were (If nodes and a bool input are not tried with TensorRT here).
"""

from __future__ import annotations

import math

from runtime.manifest import TensorSpec

THEN, ELSE = "__gate_on", "__gate_off"  # suffixes of the branches' own output names


def _reads(node) -> list[str]:
    """Every tensor name `node` reads: its inputs and, for nodes with subgraphs (If, Loop,
    Scan), the outer-scope names those subgraphs read."""
    from onnx import AttributeProto

    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for g in graphs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [r for n in g.node for r in _reads(n) if r not in inner]
    return names


def _cone(nodes: list, targets: set[str]) -> set[int]:
    """Indices of the nodes whose outputs reach any of `targets` (walking back from them)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    seen, todo = set(), [producer[t] for t in targets if t in producer]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        todo += [producer[r] for r in _reads(nodes[k]) if r in producer]
    return seen


def gate_only_nodes(graph, switched: list[str]) -> list[int]:
    """Indices (in graph order) of the nodes that feed only the outputs named `switched`: those
    reached walking back from them and from no other graph output."""
    others = {o.name for o in graph.output} - set(switched)
    nodes = list(graph.node)
    keep = _cone(nodes, others)
    return sorted(_cone(nodes, set(switched)) - keep)


def _batch_dims(graph) -> dict[str, tuple[str, int]]:
    """Named dim -> (an input that has it, its axis): where the else-branch reads a size."""
    found = {}
    for i in graph.input:
        for axis, d in enumerate(i.type.tensor_type.shape.dim):
            if d.dim_param and d.dim_param not in found:
                found[d.dim_param] = (i.name, axis)
    return found


def _fill_nodes(name: str, spec: TensorSpec, elem_type: int, value: float, dims: dict, helper, TensorProto) -> list:
    """Nodes of the else-branch making `name`: `spec.shape` (named dims read from the graph's
    inputs) filled with `value`."""
    if not spec.shape:  # a scalar
        return [helper.make_node("Constant", [], [name + ELSE], value=helper.make_tensor(name, elem_type, [], [value]))]
    parts, nodes = [], []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            part = helper.make_tensor(f"{name}/dim{axis}", TensorProto.INT64, [1], [d])
            nodes.append(helper.make_node("Constant", [], [f"{name}/dim{axis}"], value=part))
        elif d in dims:
            src, at = dims[d]
            nodes.append(helper.make_node("Shape", [src], [f"{name}/dim{axis}"], start=at, end=at + 1))
        else:
            raise ValueError(f"gate switch: no graph input has dimension {d!r} of {spec.name}")
        parts.append(f"{name}/dim{axis}")
    shape = parts[0]
    if len(parts) > 1:
        shape = f"{name}/shape"
        nodes.append(helper.make_node("Concat", parts, [shape], axis=0))
    fill = helper.make_tensor(f"{name}/value", elem_type, [1], [value])
    nodes.append(helper.make_node("ConstantOfShape", [shape], [name + ELSE], value=fill))
    return nodes


def switch_gate(model, switched: list[TensorSpec], gate_on: TensorSpec, fills: dict[str, float]) -> int:
    """Move, in place, the nodes of `model` (an onnx.ModelProto) that feed only the `switched`
    outputs under an `If` on the new bool scalar input `gate_on`; with it false those outputs
    are `fills[role]` everywhere. Returns the number of nodes moved (0: nothing to switch, the
    model is unchanged)."""
    from onnx import TensorProto, helper

    g = model.graph
    names = [s.name for s in switched]
    outputs = {o.name: o for o in g.output}
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"gate switch: the graph has no output {missing}")
    moved = gate_only_nodes(g, names)
    made = {o for k in moved for o in g.node[k].output}
    if not moved or any(n not in made for n in names):
        return 0  # an output the gate shares with the rest of the graph (or none at all): leave it
    nodes = list(g.node)
    inner = [nodes[k] for k in moved]
    rename = {n: n + THEN for n in names}
    for node in inner:  # the branch makes its own copy of each output; the If gives the graph's name
        for field in (node.input, node.output):
            for i, x in enumerate(field):
                field[i] = rename.get(x, x)
    made = {o for n in inner for o in n.output}
    moved_set = set(moved)
    rest = [n for k, n in enumerate(nodes) if k not in moved_set]
    read_outside = {r for n in rest for r in _reads(n)}
    read_inside = {r for n in inner for r in _reads(n)}
    own = [t for t in g.initializer if t.name in read_inside and t.name not in read_outside]
    own_names = {t.name for t in own}
    infos = [v for v in g.value_info if v.name in made]
    then_out, else_out, else_nodes, dims = [], [], [], _batch_dims(g)
    for spec in switched:
        out = outputs[spec.name]
        then_out.append(helper.make_value_info(spec.name + THEN, out.type))
        else_out.append(helper.make_value_info(spec.name + ELSE, out.type))
        else_nodes += _fill_nodes(spec.name, spec, out.type.tensor_type.elem_type, fills[spec.role], dims,
                                  helper, TensorProto)
    then_graph = helper.make_graph(inner, "gate_then", [], then_out, initializer=own, value_info=infos)
    else_graph = helper.make_graph(else_nodes, "gate_else", [], else_out)
    switch = helper.make_node("If", [gate_on.name], names, name="/gate_switch/If",
                              then_branch=then_graph, else_branch=else_graph)
    del g.node[:]
    g.node.extend(rest + [switch])  # last: every outer value the branches read is made before it
    kept = [t for t in g.initializer if t.name not in own_names]
    del g.initializer[:]
    g.initializer.extend(kept)
    left = [v for v in g.value_info if v.name not in made]
    del g.value_info[:]
    g.value_info.extend(left)
    g.input.append(helper.make_tensor_value_info(gate_on.name, TensorProto.BOOL, []))
    return len(inner)


def gate_specs(outputs: list[TensorSpec]) -> tuple[list[TensorSpec], TensorSpec]:
    """The outputs a gated segment switches (its score, and the head's input in gate mode) and
    the input spec of the switch."""
    from runtime import roles as R

    switched = [t for t in outputs if t.role in (R.CONFIDENCE, R.EXIT_HIDDEN)]
    return switched, TensorSpec(R.GATE_ON, R.GATE_ON, "bool", ())


def switch_segment_file(path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> tuple[list[TensorSpec], int]:
    """Apply `switch_gate` to the segment graph at `path` (rewritten in place, checked) and
    return its inputs with `gate_on` added, and the nodes moved (0: the file is untouched)."""
    import onnx

    from runtime import roles as R

    from .onnx_files import save_graph

    switched, gate_on = gate_specs(outputs)
    model = onnx.load(str(path))
    moved = switch_gate(model, switched, gate_on, {R.CONFIDENCE: -math.inf, R.EXIT_HIDDEN: 0.0})
    if not moved:
        return list(inputs), 0
    (path.parent / (path.name + ".data")).unlink(missing_ok=True)  # save_graph writes the weights anew
    save_graph(model, path)
    onnx.checker.check_model(str(path))
    return [*inputs, gate_on], moved
