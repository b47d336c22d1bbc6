"""Keep a GGUF model's own quantized blocks in the int4 graphs, exactly.

A model that ships as a GGUF file (SmolLM2: Q4_1 decoder weights, a Q8_0 embedding that is
also the LM head) reaches us dequantized to float. Re-quantizing those floats with
onnxruntime's block quantizer rounds them a second time: on SmolLM2 the int4 model then
agrees with the float one on only ~63% of held-out tokens (benchmarks/quant_schemes.py),
while llama.cpp runs the GGUF's blocks as they are. This module finds the blocks again in the
float weights and encodes them without loss:

* Q8_0 (`w = d * q`, q in [-127, 127], 32 inputs per block): an 8-bit MatMulNBits with
  scale d and the default zero point 128: the same numbers.
* Q4_1 (`w = d * q + m`, q in [0, 15]): MatMulNBits has integer zero points only, and -m/d
  is not an integer, so the 4-bit part carries `d * (q - 8)` (the kernel's default zero point
  8: no zero-point input, its fastest path) and the rest comes back as a small float product:
  `y = x @ (d*(q-8)) + blocksum(x) @ (m + 8d)`, where blocksum(x) sums each block of 32 inputs
  (one AveragePool, times 32 folded into the offsets; shared by every weight that reads the
  same input) and
  m + 8d is (K/32, N). Exact up to float rounding, at ~3 small extra ops per layer input.
  Centring matters beyond speed: at accuracy level 4 the kernel rounds x to int8 per block,
  and that rounding error is weighted by the 4-bit part's values. With `d*q` (all >= 0, mean
  ~7.5d) it is weighted by much larger numbers than the weights themselves; with `d*(q-8)`
  by about the weights (m ~ -7.5d), which is what llama.cpp's Q4_1 x q8_1 product does
  (it folds m into the rounded activations' block sums).

A block is taken as Q4_1 when its 32 values sit on 16 evenly spaced levels from its minimum
(what Q4_1's quantizer produces: the minimum and maximum are levels 0 and 15), as Q8_0 when
they are integer multiples of max|w| / 127; a weight is encoded only if every block passes.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
PREFIX = "/gguf_exact/"  # names of the nodes this pass adds (the quantizer must leave them alone)
_TOL = 1e-5  # relative to a block's largest value (fp32 rounding of d*q + m), far below half a level


def q4_1_blocks(w: np.ndarray):
    """(d, m, q) with w[k, n] = d[n, b] * q[n, b, i] + m[n, b] for k = 32*b + i, or None when
    the (K, N) weight does not hold Q4_1 blocks."""
    k, n = w.shape
    if k % BLOCK:
        return None
    b = w.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    lo, hi = b.min(-1), b.max(-1)
    d = (hi - lo) / 15.0
    safe = np.where(d > 0, d, 1.0)
    q = np.rint((b - lo[..., None]) / safe[..., None])
    err = np.abs(d[..., None] * q + lo[..., None] - b).max(-1)
    if not np.all(err <= _TOL * (np.abs(lo) + 15 * np.abs(d) + 1e-30)):  # relative to the block's values
        return None
    return d.astype(np.float32), lo.astype(np.float32), q.astype(np.uint8)


def q8_0_blocks(w: np.ndarray):
    """(d, q) with w[k, n] = d[n, b] * q[n, b, i], q in [-127, 127], or None."""
    k, n = w.shape
    if k % BLOCK:
        return None
    b = w.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    d = np.abs(b).max(-1) / 127.0
    safe = np.where(d > 0, d, 1.0)
    q = np.rint(b / safe[..., None])
    err = np.abs(d[..., None] * q - b).max(-1)
    if not np.all(err <= _TOL * (127 * d + 1e-30)):  # relative to the block's largest value
        return None
    return d.astype(np.float32), q.astype(np.int16)


def _ranks(model) -> dict[str, int]:
    """Rank of every tensor whose shape inference knows it (empty if inference fails)."""
    from onnx import shape_inference

    try:
        g = shape_inference.infer_shapes(model).graph
    except Exception:  # an unknown op or a model too large to infer in memory: MatMul blocksums
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in list(g.value_info) + list(g.input)
            if v.type.tensor_type.HasField("shape")}


def blocksum_nodes(x: str, out: str, k: int, rank: int | None, opset: int, new_inits: list,
                   consts: dict) -> tuple[list, float]:
    """Nodes computing blocksum(x) / scale, the sum of each block of 32 inputs divided by
    `scale`, (..., K) -> (..., K/32); returns (nodes, scale), and the caller multiplies the
    offsets by `scale` (a power of two: exact in float).

    Rank 3 (batch, sequence, K), what decoder layers have: one AveragePool over windows of 32
    (`scale` 32), one node where Reshape + ReduceSum are two (each small node costs ~8 us per
    call on these CPUs). Other known ranks: Reshape to (..., K/32, 32) + ReduceSum (SmolLM2's
    int4 chain ran 1.04x [1.02, 1.06] the speed of the 0/1-MatMul encoding, paired:
    benchmarks/results/smollm2-135m/blocksum-ab). Unknown rank: one MatMul with a 0/1
    (K, K/32) matrix, which works at any rank."""
    from onnx import helper, numpy_helper

    def const(key, value):
        if key not in consts:
            consts[key] = f"{PREFIX}{key}"
            new_inits.append(numpy_helper.from_array(value, consts[key]))
        return consts[key]

    if rank == 3:
        return [helper.make_node("AveragePool", [x], [out], name=out, kernel_shape=[BLOCK], strides=[BLOCK])], \
            float(BLOCK)
    if rank is not None and rank >= 2:
        shape = const(f"blocks_{rank}_{k}", np.array([0] * (rank - 1) + [k // BLOCK, BLOCK], np.int64))
        reshape = helper.make_node("Reshape", [x, shape], [out + "_blocks"], name=out + "_reshape")
        if opset < 13:  # axes became an input in opset 13
            return [reshape, helper.make_node("ReduceSum", [out + "_blocks"], [out], name=out, axes=[-1],
                                              keepdims=0)], 1.0
        axis = const("last_axis", np.array([-1], np.int64))
        return [reshape, helper.make_node("ReduceSum", [out + "_blocks", axis], [out], name=out, keepdims=0)], 1.0
    one = np.zeros((k, k // BLOCK), np.float32)
    one[np.arange(k), np.arange(k) // BLOCK] = 1.0
    return [helper.make_node("MatMul", [x, const(f"ones_{k}", one)], [out], name=out)], 1.0


def _centred_offsets(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """m + 8d, each block's offset once the 4-bit part is d * (q - 8) (float64 sum: exact for
    the fp16 d and m a GGUF stores, then rounded once to fp32)."""
    return (m.astype(np.float64) + 8.0 * d.astype(np.float64)).astype(np.float32)


def _pack4(q: np.ndarray) -> np.ndarray:
    """(N, blocks, 32) values 0..15 -> MatMulNBits' (N, blocks, 16) bytes, low nibble first."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def encode_exact_blocks(model, exclude_prefixes: tuple[str, ...] = (), accuracy_level: int = 4) -> dict:
    """Rewrite, in place, every MatMul of `model` whose constant weight holds Q4_1 or Q8_0
    blocks (nodes named with `exclude_prefixes` stay). Returns counts {"q4_1": n, "q8_0": n}."""
    from onnx import helper, numpy_helper

    from .fuse_matmuls import initializers_and_users

    g = model.graph
    inits, users = initializers_and_users(g)
    out_nodes, new_inits, sums, consts = [], [], {}, {}
    ranks = _ranks(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    counts = {"q4_1": 0, "q8_0": 0}

    def nbits(x, name, packed, scales):  # MatMulNBits inputs; no zero point: the kernel's default
        new_inits.extend([numpy_helper.from_array(packed, name + "_B"),
                          numpy_helper.from_array(scales.reshape(-1), name + "_scales")])
        return [x, name + "_B", name + "_scales"]

    for node in g.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name not in inits or node.name.startswith(exclude_prefixes) or node.name.startswith(PREFIX):
            out_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name])
        if w.ndim != 2 or w.dtype != np.float32:
            out_nodes.append(node)
            continue
        k, n = w.shape
        name = PREFIX + (node.name or node.output[0]).strip("/").replace("/", "_")
        x, y = node.input[0], node.output[0]
        q41 = q4_1_blocks(w)
        if q41 is not None:
            d, m, q = q41
            ins = nbits(x, name, _pack4(q), d)  # default zero point 8: d * (q - 8)
            part = name + "_scaled"
            out_nodes.append(helper.make_node("MatMulNBits", ins, [part], name=name, domain="com.microsoft",
                                              K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=accuracy_level))
            if x not in sums:
                nodes, scale = blocksum_nodes(x, name + "_blocksum", k, ranks.get(x), opset, new_inits, consts)
                sums[x] = (name + "_blocksum", scale)
                out_nodes.extend(nodes)
            offsets = _centred_offsets(d, m).T * np.float32(sums[x][1])  # x a power of two: exact
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(offsets), name + "_offsets"))
            out_nodes.append(helper.make_node("MatMul", [sums[x][0], name + "_offsets"], [name + "_offset"],
                                              name=name + "_offset"))
            out_nodes.append(helper.make_node("Add", [part, name + "_offset"], [y], name=name + "_add"))
            counts["q4_1"] += 1
        else:
            q80 = q8_0_blocks(w)
            if q80 is None:
                out_nodes.append(node)
                continue
            d, q = q80
            ins = nbits(x, name, (q + 128).astype(np.uint8), d)  # zero point: 8-bit default 128
            out_nodes.append(helper.make_node("MatMulNBits", ins, [y], name=name, domain="com.microsoft",
                                              K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=accuracy_level))
            counts["q8_0"] += 1
        users[w_name] -= 1
        if users[w_name] == 0:
            g.initializer.remove(inits.pop(w_name))
    del g.node[:]
    g.node.extend(out_nodes)
    g.initializer.extend(new_inits)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def exact_twin(linear, accuracy_level: int = 4) -> str | None:
    """Give a PyTorch nn.Linear the numerics of its exact encoding, if its weight holds GGUF
    blocks: Q8_0 keeps its weight (at accuracy level 4 the kernel rounds the input to int8 per
    block); Q4_1 computes round8(x) @ (d*(q-8)) + x @ (m+8d)_expanded. Returns "q4_1", "q8_0"
    or None."""
    import torch
    import torch.nn.functional as F

    from .int8_activations import int8_activations, int8_blocks

    w = linear.weight.detach().float().numpy().T  # (K, N)
    q41 = q4_1_blocks(w)
    kind = "q4_1" if q41 is not None else ("q8_0" if q8_0_blocks(w) is not None else None)
    if kind is None:
        return None
    if kind == "q8_0":
        if accuracy_level == 4:
            linear.register_forward_pre_hook(int8_activations(BLOCK))
        return kind
    round8 = int8_blocks(BLOCK) if accuracy_level == 4 else (lambda x: x)
    d, m, q = q41
    n, nb = d.shape
    centred = q.astype(np.float32) - 8.0
    scaled = torch.from_numpy((d[..., None] * centred).reshape(n, nb * BLOCK))  # (N, K)
    offsets = torch.from_numpy(np.repeat(_centred_offsets(d, m), BLOCK, axis=1))  # (N, K): m + 8d per block
    bias = linear.bias

    def forward(x):
        return F.linear(round8(x), scaled.to(x.dtype), bias) + F.linear(x, offsets.to(x.dtype))

    linear.forward = forward
    return kind
