"""Attention through onnxruntime's `com.microsoft::GroupQueryAttention`, on a KV buffer.

Why: a segment that returns ``present = concat(past, new)`` copies its whole cache on
every token, so decoding slows down as the context grows. GroupQueryAttention instead
reads and writes a preallocated buffer ``(B, kv_heads, capacity, head_dim)``: the runtime
binds the same memory as ``past_key`` and ``present_key`` (onnxruntime IOBinding), the op
writes only the new positions ``[T - S, T)`` and attends over ``[0, T)``, where
``T = seqlens_k + 1`` (``total_sequence_length`` is the batch maximum of T). This is what
onnxruntime-genai does (its "past_present_share_buffer").

`GroupQueryAttention.apply` traces into that single node (TorchScript exporter, via
`symbolic`); its `forward` is a plain PyTorch reference of the op, used for shapes while
tracing and to check the semantics in tests. Batch entries must share one length here
(the runtime runs batch 1); rotary embedding is applied inside the op when cos/sin caches
are given (positions T - S .. T - 1, which is what the runtime's positions are).
"""

from __future__ import annotations

import warnings

import torch

DOMAIN = "com.microsoft"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE (rotate_half), x (B, H, S, hd), cos/sin (S, hd/2)."""
    c = torch.cat([cos, cos], dim=-1)
    s = torch.cat([sin, sin], dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rot * s


def reference(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int, scale: float):
    """What the op computes (causal, shared buffer, one length for the whole batch).

    q (B, S, H*hd), k/v (B, S, KV*hd), past_k/v (B, KV, C, hd), seqlens_k (B,) int32.
    Returns output (B, S, H*hd) and the buffers with positions [T-S, T) written.
    """
    b, s, _ = q.shape
    hd = past_k.shape[-1]
    t = int(seqlens_k.max()) + 1
    p = t - s
    if p < 0 or t > past_k.shape[2]:
        raise ValueError(f"GroupQueryAttention: {s} new positions ending at {t} do not fit a buffer of {past_k.shape[2]}")
    q = q.view(b, s, num_heads, hd).transpose(1, 2)
    k = k.view(b, s, kv_heads, hd).transpose(1, 2)
    v = v.view(b, s, kv_heads, hd).transpose(1, 2)
    if cos is not None:
        q, k = _rotate(q, cos[p:t], sin[p:t]), _rotate(k, cos[p:t], sin[p:t])
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, p:t] = k
    present_v[:, :, p:t] = v
    keys = present_k[:, :, :t].repeat_interleave(num_heads // kv_heads, dim=1)  # (B, H, T, hd)
    values = present_v[:, :, :t].repeat_interleave(num_heads // kv_heads, dim=1)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, H, S, T)
    allowed = torch.arange(t).unsqueeze(0) <= (torch.arange(s) + p).unsqueeze(1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1).to(q.dtype) @ values).transpose(1, 2).reshape(b, s, num_heads * hd)
    return out, present_k, present_v


class GroupQueryAttention(torch.autograd.Function):
    """`apply(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale)`;
    cos/sin None means the caller already applied rotary (or the model has none)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale):
        with warnings.catch_warnings():
            # while tracing, `symbolic` is the graph's one node and this only gives the outputs'
            # shapes: the reference's Python ints (the buffer's end) are not baked into anything
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return reference(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, scale):
        rotary = cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone())
        args = [q, k, v, past_k, past_v, seqlens_k, total] + ([cos, sin] if rotary else [])
        out, pk, pv = g.op(f"{DOMAIN}::GroupQueryAttention", *args, num_heads_i=num_heads, kv_num_heads_i=kv_heads,
                           scale_f=scale, do_rotary_i=int(rotary), rotary_interleaved_i=0, outputs=3)
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


def gqa(q, k, v, past_k, past_v, seqlens_k, total, cos=None, sin=None, *, num_heads: int, kv_heads: int,
        scale: float):
    return GroupQueryAttention.apply(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads,
                                     float(scale))
