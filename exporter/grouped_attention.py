"""Attention that computes a position the same way whatever the call's shape (concat KV layout).

Exact decoding verifies S drafted positions in one call and keeps those equal to what the
full path, one position per call, would have chosen. That holds bit for bit only if every
kernel computes a position's row the same way in both calls. transformers' eager attention,
as exported, multiplies each head separately: (S, d) @ (d, keys) and (S, keys) @ (keys, d).
At S = 1 onnxruntime's MatMul takes its one-row path (MLAS), whose sums round differently
from the many-row path a verification call takes: up to 2e-05 in attention outputs at a few
hundred keys (benchmarks/results/smollm2-135m/shape-invariance), which int8 activations in
int4 exports amplify to ~0.3 logit, enough to flip near-ties.

Here the heads that share a key/value head are folded into the rows of one product
(B, kv_heads, groups*S, d), as grouped-query attention allows: with groups >= 2 a decode call
already has >= 2 rows, so every call takes the many-row path, whose rows do not depend on the
row count, on the key count (later keys weigh exactly 0) or on each other. Same arithmetic as
eager attention otherwise (scale after the product, optional soft-cap, additive mask, softmax
in float32). Models with one head per key/value head (groups = 1) still have one row at
decode; their concat exports stay as exact as fp32 rounding allows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NAME = "lama_grouped"
_traced: list[list[int]] = []  # while grouped_attention_in is open: the groups of each attention traced


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, H, S, d), key/value (B, KV, T, d) -> (output (B, S, H, d), weights (B, H, S, T))."""
    b, h, s, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    for seen in _traced:
        seen.append(int(getattr(module, "num_key_value_groups", 1)))  # unknown: 1, claims nothing
    q = query.reshape(b, kv, (h // kv) * s, d)  # heads of one group are consecutive: rows (group, position)
    w = (torch.matmul(q, key.transpose(2, 3)) * scaling).reshape(b, h, s, t)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w.reshape(b, kv, (h // kv) * s, t), value).reshape(b, h, s, d)
    return out.transpose(1, 2).contiguous(), w


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_attention)


def _configs(model: nn.Module) -> list:
    """The model's config and its sub-configs that carry an attention implementation."""
    found, todo = [], [model.config]
    while todo:
        c = todo.pop()
        found.append(c)
        todo += [getattr(c, k) for k in getattr(c, "sub_configs", {}) if getattr(c, k, None) is not None]
    return found


@contextmanager
def grouped_attention_in(model: nn.Module):
    """Trace `model`'s attention as `grouped_attention` inside the block (the ONNX export),
    then put its own back (training and calibration keep transformers' eager attention).
    Yields a list that collects the groups (query heads per key/value head) of every attention
    traced through it: `row_invariant` reads it."""
    _register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    seen: list[int] = []
    _traced.append(seen)
    try:
        for c in configs:
            c._attn_implementation = NAME
        yield seen
    finally:
        _traced.remove(seen)
        for c, old in zip(configs, before):
            c._attn_implementation = old


def row_invariant(groups_traced: list[int], layers: int) -> bool:
    """Whether the exported graphs compute a position the same way whatever the call's shape:
    every one of the `layers` decoder layers traced through `grouped_attention` (at least once
    per layer: some graphs repeat layers) with >= 2 query heads per key/value head."""
    return len(groups_traced) >= layers and min(groups_traced) >= 2
