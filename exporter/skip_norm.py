"""Residual add + RMSNorm as onnxruntime's `com.microsoft::SkipSimplifiedLayerNormalization`.

Why: a pre-norm decoder layer adds a residual and then normalizes the sum, twice per layer.
Traced from PyTorch that is an Add and an RMSNorm (which onnxruntime fuses into
SimplifiedLayerNormalization, but not with the Add before it): two kernels and one more pass
over the hidden state per norm, ~60 extra nodes per token on a 30-layer model, where each
small node costs ~8 us on a 2-core CPU (../shared/KNOWN.md). The contrib op does both in one
kernel and returns the sum too (its 4th output), which is the residual stream the layer
carries on. onnxruntime-genai's model builder writes the same op.

`skip_rms_norm(x, skip, norm)` traces into that single node (TorchScript exporter, via
`symbolic`); its `forward` is transformers' LlamaRMSNorm arithmetic on `x + skip` (float32
statistics, weight applied in the input dtype), used while tracing and by the PyTorch twins.
Only the KV-buffer layout uses it: it is an onnxruntime op, like GroupQueryAttention there.
"""

from __future__ import annotations

import torch

from .gqa import DOMAIN


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in float32, weight applied in the input dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class SkipRMSNorm(torch.autograd.Function):
    """`apply(x, skip, weight, eps)` -> (rmsnorm(x + skip) * weight, x + skip)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        total = x + skip
        return rms_norm_reference(total, weight, eps), total

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        # outputs: normed, mean, inv_std_var, input_skip_bias_sum (the op's own order)
        out, _mean, _inv, total = g.op(f"{DOMAIN}::SkipSimplifiedLayerNormalization", x, skip, weight,
                                       epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + skip), x + skip) for a Llama-style RMSNorm module (`weight`, `variance_epsilon`)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    return SkipRMSNorm.apply(x, skip, norm.weight, float(eps))
