"""Int8 activation rounding as onnxruntime's MatMulNBits does it, in PyTorch.

At accuracy level 4 the MatMulNBits CPU kernel rounds its float input to int8 per block of
`block_size` inputs (symmetric, one scale per block: max |x| / 127, half to even) before the
product, as llama.cpp's q8_1 activations do. The PyTorch twins that calibrate thresholds on a
quantized model (exporter/quantize.py's `fake_quantize` for re-quantized weights,
exporter/gguf_blocks.py's `exact_twin` for GGUF blocks kept exactly) round the same way, so
their logits match the graphs' to ~1e-5. Both import these two helpers from here.
"""

from __future__ import annotations


def int8_blocks(block_size: int):
    """x -> x rounded as MatMulNBits rounds its input at accuracy level 4: symmetric int8 per
    row, one scale per block of `block_size` inputs (max |x| / 127), half to even."""
    import torch
    import torch.nn.functional as F

    def round8(x):
        k = x.shape[-1]
        pad = -k % block_size
        xb = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block_size)  # (..., K/bs, bs)
        scale = xb.abs().amax(-1, keepdim=True) / 127.0
        scale = scale.masked_fill(scale == 0, 1.0)
        return (torch.round(xb / scale) * scale).reshape(*x.shape[:-1], -1)[..., :k]

    return round8


def int8_activations(block_size: int):
    """A forward pre-hook that rounds a Linear's input as MatMulNBits does at accuracy level 4
    (`linear.register_forward_pre_hook(int8_activations(32))`)."""
    round8 = int8_blocks(block_size)

    def hook(module, args):
        return (round8(args[0]),) + tuple(args[1:])

    return hook
