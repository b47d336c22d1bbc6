"""Prototype (monkeypatch, not committed to exporter/): exact MatMulNBits encodings for the
GGUF block kinds gemma-3-270m's Q4_K_M file holds besides Q8_0.

* Q4_K: per 32-block w = d_b*q + m_b with q in [0, 15] but the block's min/max need not be
  levels 0/15 -> detect d_b as the smallest gap between distinct values (or a divisor of it)
  and reuse the Q4_1 encoding (4-bit d*(q-8) + float offsets).
* Q5_0 (w = d*(q-16)), Q6_K (16-blocks, w = d*sc*(q-32)), Q8_0: integer multiples of a per-block
  scale with |q| <= 127 -> 8-bit MatMulNBits, block 32 when every 32-block has one scale,
  else block 16 (Q6_K).
"""
import numpy as np
import exporter.gguf_blocks as gb

_orig_q41 = gb.q4_1_blocks
TOL_Q = 1e-3  # in units of the level spacing


def q4_gap_blocks(w):
    r = _orig_q41(w)
    if r is not None:
        return r
    k, n = w.shape
    if k % 32:
        return None
    b = w.T.reshape(n, k // 32, 32).astype(np.float64)
    lo, hi = b.min(-1), b.max(-1)
    s = np.sort(b, -1)
    g = np.diff(s, axis=-1)
    big = np.abs(b).max(-1)[..., None] + 1e-30
    g = np.where(g > 1e-4 * big, g, np.inf).min(-1)
    flat = ~np.isfinite(g)
    g = np.where(flat, 1.0, g)
    ok_all = np.zeros(g.shape, bool)
    d = np.ones_like(g)
    for j in (1, 2, 3, 4):
        dj = g / j
        q = np.rint((b - lo[..., None]) / dj[..., None])
        ok = (np.abs((b - lo[..., None]) / dj[..., None] - q).max(-1) <= TOL_Q) & (q.max(-1) <= 15)
        new = ok & ~ok_all
        d = np.where(new, dj, d)
        ok_all |= ok
    ok_all |= flat
    if not ok_all.all():
        return None
    d = np.where(flat, 0.0, d)
    q = np.rint((b - lo[..., None]) / np.where(d > 0, d, 1.0)[..., None])
    q = np.where(flat[..., None], 0, q)
    return d.astype(np.float32), lo.astype(np.float32), q.astype(np.uint8)


def int8_blocks(w, bs):
    """(d, q, bs): w = d*q per block of bs along K, |q| <= 127, or None."""
    k, n = w.shape
    if k % bs:
        return None
    b = w.T.reshape(n, k // bs, bs).astype(np.float64)
    m = np.abs(b).max(-1)
    safe = np.where(m > 0, m, 1.0)
    found = m == 0
    d = np.zeros_like(m)
    for kk in range(1, 128):
        dk = safe / kk
        x = b / dk[..., None]
        ok = np.abs(x - np.rint(x)).max(-1) <= TOL_Q
        new = ok & ~found
        d = np.where(new, dk, d)
        found |= ok
        if found.all():
            break
    if not found.all():
        return None
    q = np.rint(b / np.where(d > 0, d, 1.0)[..., None])
    return d.astype(np.float32), q.astype(np.int16), bs


def int8_any(w):
    return int8_blocks(w, 32) or int8_blocks(w, 16)


def encode_exact_blocks(model, exclude_prefixes=(), accuracy_level=4):
    from onnx import helper, numpy_helper
    from exporter.fuse_matmuls import initializers_and_users

    g = model.graph
    inits, users = initializers_and_users(g)
    out_nodes, new_inits, sums, consts = [], [], {}, {}
    ranks = gb._ranks(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    counts = {"q4_1": 0, "q8_0": 0}

    def nbits(x, name, packed, scales):
        new_inits.extend([numpy_helper.from_array(packed, name + "_B"),
                          numpy_helper.from_array(scales.reshape(-1), name + "_scales")])
        return [x, name + "_B", name + "_scales"]

    for node in g.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name not in inits or node.name.startswith(exclude_prefixes) or node.name.startswith(gb.PREFIX):
            out_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name])
        if w.ndim != 2 or w.dtype != np.float32:
            out_nodes.append(node)
            continue
        k, n = w.shape
        name = gb.PREFIX + (node.name or node.output[0]).strip("/").replace("/", "_")
        x, y = node.input[0], node.output[0]
        q41 = q4_gap_blocks(w)
        if q41 is not None:
            d, m, q = q41
            ins = nbits(x, name, gb._pack4(q), d)
            part = name + "_scaled"
            out_nodes.append(helper.make_node("MatMulNBits", ins, [part], name=name, domain="com.microsoft",
                                              K=k, N=n, bits=4, block_size=32, accuracy_level=accuracy_level))
            if x not in sums:
                nodes, scale = gb.blocksum_nodes(x, name + "_blocksum", k, ranks.get(x), opset, new_inits, consts)
                sums[x] = (name + "_blocksum", scale)
                out_nodes.extend(nodes)
            offsets = gb._centred_offsets(d, m).T * np.float32(sums[x][1])
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(offsets), name + "_offsets"))
            out_nodes.append(helper.make_node("MatMul", [sums[x][0], name + "_offsets"], [name + "_offset"],
                                              name=name + "_offset"))
            out_nodes.append(helper.make_node("Add", [part, name + "_offset"], [y], name=name + "_add"))
            counts["q4_1"] += 1
        else:
            r = int8_any(w)
            if r is None:
                out_nodes.append(node)
                continue
            d, q, bs = r
            ins = nbits(x, name, (q + 128).astype(np.uint8), d)
            out_nodes.append(helper.make_node("MatMulNBits", ins, [y], name=name, domain="com.microsoft",
                                              K=k, N=n, bits=8, block_size=bs, accuracy_level=accuracy_level))
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


def exact_twin(linear, accuracy_level=4):
    import torch
    import torch.nn.functional as F
    from exporter.int8_activations import int8_activations, int8_blocks as round_blocks

    w = linear.weight.detach().float().numpy().T
    q41 = q4_gap_blocks(w)
    if q41 is None:
        r = int8_any(w)
        if r is None:
            return None
        if accuracy_level == 4:
            linear.register_forward_pre_hook(int8_activations(r[2]))
        return "q8_0"
    round8 = round_blocks(32) if accuracy_level == 4 else (lambda x: x)
    d, m, q = q41
    n, nb = d.shape
    scaled = torch.from_numpy((d[..., None] * (q.astype(np.float32) - 8.0)).reshape(n, nb * 32))
    offsets = torch.from_numpy(np.repeat(gb._centred_offsets(d, m), 32, axis=1))
    bias = linear.bias

    def forward(x):
        return F.linear(round8(x), scaled.to(x.dtype), bias) + F.linear(x, offsets.to(x.dtype))

    linear.forward = forward
    return "q4_1"


def apply():
    gb.q4_1_blocks = q4_gap_blocks
    gb.encode_exact_blocks = encode_exact_blocks
    gb.exact_twin = exact_twin
