"""Weight-only quantization of exported graphs, and the same numerics in PyTorch.

`quantize_graph` rewrites every MatMul with a constant weight in an exported ONNX graph into
onnxruntime's `MatMulNBits` (4 or 8 bits, blocks of `block_size` along the input dimension),
with onnxruntime's own `MatMulNBitsQuantizer`. What gets quantized: the decoder layers'
projections, the exit heads (adapters, full heads) and the LM head: in a model with tied
embeddings such as SmolLM2 the LM head is a MatMul with the transposed embedding, which
tracing folds into its own initializer, so it is quantized too while the embedding's Gather
stays in float. The exit gates stay fp32 (they are tiny and decide who leaves).

`fake_quantize` gives a PyTorch model the same weights the quantized graphs use: each weight
goes through onnxruntime's own block quantizer (the function `MatMulNBitsQuantizer` calls),
then is dequantized, `(q - zero_point) * scale`, so the thresholds can be calibrated on what
the quantized model says rather than on the fp32 model. With accuracy level 0 the kernel
computes in float with exactly those weights; accuracy level 4 also rounds the activations
to int8 per block inside the kernel, which `fake_quantize` mimics with a forward pre-hook
(exporter/int8_activations.py, shared with exporter/gguf_blocks.py's exact twin).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.manifest import QuantizationInfo

from .onnx_files import save_graph

EXCLUDE_PREFIXES = ("/gates/",)  # node-name prefixes left in float: the exit gates (Segment.gates)
SCHEMES = {
    # precision -> (bits, block size, symmetric, accuracy level, exact GGUF blocks); chosen by
    # measurement (docs/design.md, Export; benchmarks/results/smollm2-135m/llamacpp_fidelity/)
    "int4": (4, 32, True, 4, True),
    "int8": (8, 32, True, 4, False),
}


@dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    exact_blocks: bool = False  # weights that hold GGUF Q4_1/Q8_0 blocks keep them (exporter/gguf_blocks.py)

    @classmethod
    def for_precision(cls, precision: str, *, block_size: int | None = None, symmetric: bool | None = None,
                      accuracy_level: int | None = None, exact_blocks: bool | None = None) -> "Scheme":
        if precision not in SCHEMES:
            raise ValueError(f"no quantization scheme for precision {precision!r}; choose one of {sorted(SCHEMES)}")
        bits, block, sym, acc, exact = SCHEMES[precision]
        s = cls(bits, block if block_size is None else block_size, sym if symmetric is None else symmetric,
                acc if accuracy_level is None else accuracy_level, exact if exact_blocks is None else exact_blocks)
        if s.block_size < 16 or s.block_size & (s.block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {s.block_size}")
        if s.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0-4, got {s.accuracy_level}")
        return s

    def info(self, graphs: list[str], quantized_matmuls: int, float_matmuls: list[str],
             calibration: dict | None = None, exact: dict | None = None) -> QuantizationInfo:
        method = "onnxruntime MatMulNBits (weight-only, round-to-nearest)"
        if exact and any(exact.values()):
            method += ("; GGUF blocks kept exactly: Q4_1/Q4_K as 4-bit d*(q-8) + float block offsets m+8d, "
                       "Q8_0/Q5_0 as 8-bit (blocks of 32), Q6_K as 8-bit (blocks of 16)")
        return QuantizationInfo(method=method, bits=self.bits, exact_blocks=dict(exact or {}),
                                block_size=self.block_size, symmetric=self.symmetric,
                                accuracy_level=self.accuracy_level, graphs=tuple(graphs),
                                quantized_matmuls=quantized_matmuls, float_matmuls=tuple(float_matmuls),
                                calibration=calibration or {})


def _constant_matmuls(model) -> tuple[list[str], set[str]]:
    """Names of MatMul nodes whose second input is an initializer, and the initializer names."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits], inits


def _constant_weights_to_initializers(model) -> int:
    """Tracing stores some weights as Constant nodes, not initializers: a tied LM head's transposed
    embedding is one, the embedding table a Gather reads another. The quantizer (and the exact
    GGUF encodings) only see initializers, so move the Constants that feed a MatMul's weight input
    or a Gather's table there. Returns how many moved."""
    from onnx import numpy_helper

    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    weights |= {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    moved = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in weights:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and len(attr.t.dims) == 2:
                arr = numpy_helper.to_array(attr.t)
                model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                moved.append(node)
    for node in moved:
        model.graph.node.remove(node)
    return len(moved)


def _quantizer_class():
    """onnxruntime's MatMulNBitsQuantizer, imported without the INFO logging it switches on for the
    whole process (its module calls logging.basicConfig(level=INFO) and logs every node)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def quantize_graph(path: Path, scheme: Scheme) -> tuple[int, list[str], dict]:
    """Quantize `path` in place; returns (MatMulNBits nodes made, constant MatMuls left in float,
    {kind: n} weights whose GGUF blocks were kept exactly, for every gguf_blocks.KINDS)."""
    import onnx

    from .fuse_matmuls import fuse_shared_input_matmuls, pack_qkv_into_attention
    from .gguf_blocks import KINDS, PREFIX, encode_exact_blocks

    MatMulNBitsQuantizer = _quantizer_class()
    model = onnx.load(str(path))
    _constant_weights_to_initializers(model)
    fuse_shared_input_matmuls(model, EXCLUDE_PREFIXES)  # q|k|v and gate|up: fewer, larger kernels
    pack_qkv_into_attention(model)  # GroupQueryAttention reads q|k|v packed: no Split
    exact = dict.fromkeys(KINDS, 0)
    if scheme.exact_blocks:
        exact = encode_exact_blocks(model, EXCLUDE_PREFIXES, scheme.accuracy_level)
    keep = EXCLUDE_PREFIXES + (PREFIX,)  # the gates, and the exact blocks' own small float products
    names, _ = _constant_matmuls(model)
    exclude = [n for n in names if n.startswith(keep)]
    q = MatMulNBitsQuantizer(model, bits=scheme.bits, block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                             accuracy_level=scheme.accuracy_level or None, nodes_to_exclude=exclude)
    q.process()
    out = q.model.model
    made = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    left, _ = _constant_matmuls(out)
    unexpected = [n for n in left if not n.startswith(keep)]
    if unexpected:
        raise RuntimeError(f"{path.name}: onnxruntime's quantizer left weight MatMuls in float: {unexpected[:5]}")
    for f in path.parent.glob(path.name + ".data"):
        f.unlink()
    save_graph(out, path)
    onnx.checker.check_model(str(path))
    return made, [n for n in left if not n.startswith(PREFIX)], exact


# -- the same weights in PyTorch ---------------------------------------------------------------
def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 bytes holding two 4-bit values (low nibble first) -> the first n values along the last axis."""
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def dequantized(weight: np.ndarray, scheme: Scheme) -> np.ndarray:
    """What MatMulNBits multiplies by: `weight` (K, N) through onnxruntime's block quantizer and back."""
    from onnxruntime.capi import _pybind_state as ort_c

    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = w.shape  # (K, N): blocks run down each column, along the input dimension
    bs = scheme.block_size
    k_blocks = -(-rows // bs)
    padded = np.pad(w, ((0, k_blocks * bs - rows), (0, 0))) if k_blocks * bs != rows else w
    per_byte = 8 // scheme.bits
    packed = np.zeros((cols, k_blocks, bs // per_byte), dtype=np.uint8)
    zp = np.zeros((cols, -(-k_blocks // per_byte)), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    quant = ort_c.quantize_matmul_4bits if scheme.bits == 4 else ort_c.quantize_matmul_8bits
    quant(packed, np.ascontiguousarray(padded), scales, zp, bs, cols, rows, scheme.symmetric)
    if scheme.bits == 4:
        q = _unpack4(packed, bs)  # (N, k_blocks, bs)
        z = np.full((cols, k_blocks), 8, np.uint8) if scheme.symmetric else _unpack4(zp, k_blocks)
    else:
        q = packed
        z = np.full((cols, k_blocks), 128, np.uint8) if scheme.symmetric else zp
    deq = (q.astype(np.float32) - z[..., None].astype(np.float32)) * scales[..., None]  # (N, k_blocks, bs)
    return deq.reshape(cols, k_blocks * bs)[:, :rows].T  # (K, N)


def fake_quantize(modules, scheme: Scheme) -> int:
    """Give every nn.Linear in `modules` the numerics of its MatMulNBits node: the dequantized
    weight and, at accuracy level 4, int8-rounded input blocks (matches onnxruntime to ~1e-5).

    A weight shared by several modules (a tied LM head) is quantized once per module and
    untied from the others, so the embedding lookup keeps its float table as in the graphs.
    With `scheme.exact_blocks`, weights that hold GGUF blocks get their exact encoding's
    numerics instead (gguf_blocks.exact_twin). Returns the number of weights replaced."""
    import torch
    from torch import nn

    from .gguf_blocks import exact_twin
    from .int8_activations import int8_activations

    seen: set[int] = set()
    count = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Linear) and id(m) not in seen:
                seen.add(id(m))
                count += 1
                if scheme.exact_blocks and exact_twin(m, scheme.accuracy_level):
                    continue
                w = m.weight.detach().float().numpy().T  # torch keeps (N, K); MatMul's weight is (K, N)
                deq = torch.from_numpy(np.ascontiguousarray(dequantized(w, scheme).T))
                m.weight = nn.Parameter(deq.to(m.weight.dtype), requires_grad=False)
                if scheme.accuracy_level == 4:
                    m.register_forward_pre_hook(int8_activations(scheme.block_size))
    return count
