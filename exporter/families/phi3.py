"""Phi-3 / Phi-4-mini: fused qkv and gate_up projections (inside transformers' layer), an
optional sliding window on every layer (the base adapter reads `config.sliding_window`), and
su/longrope rotary scaling.

transformers' longrope rotary picks the short or the long factors from the longest position
in the call (a Python `if` on a tensor), which tracing would freeze to one branch. Here both
tables are computed and the graph selects with `torch.where`, so one exported graph is right on
both sides of `original_max_position_embeddings`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import Family


class Phi3Family(Family):
    name = "phi3"
    model_types = ("phi3",)

    def base(self) -> nn.Module:
        return self.model.model

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        rotary = self.base().rotary_emb
        params = getattr(self.config, "rope_parameters", None) or {}
        if params.get("rope_type") != "longrope":
            return super().position_embeddings(hidden, position_ids)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        original = params["original_max_position_embeddings"]
        init = ROPE_INIT_FUNCTIONS["longrope"]
        with warnings.catch_warnings():  # both tables are meant to be graph constants (a TracerWarning says so)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            short, _ = init(self.config, hidden.device, seq_len=original)
            long, _ = init(self.config, hidden.device, seq_len=original + 1)
        pos = position_ids[:, None, :].float()
        use_long = position_ids.max() + 1 > original
        inv = torch.where(use_long, long, short)  # (head_dim / 2,)
        freqs = (inv[None, :, None].float() * pos).transpose(1, 2)  # (B, S, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        cos, sin = emb.cos() * scale, emb.sin() * scale
        pe = (cos.to(hidden.dtype), sin.to(hidden.dtype))
        return dict.fromkeys(self.layer_types(), pe)
