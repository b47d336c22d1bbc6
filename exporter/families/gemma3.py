"""Gemma 3 text models (`gemma3_text`): sliding-window layers interleaved with global ones.

What differs from Llama, and where it lives:
- embeddings scaled by sqrt(hidden): inside transformers' `Gemma3TextScaledWordEmbedding`;
- (1 + w) RMSNorm, pre/post feed-forward norms, q/k norms: inside its decoder layer;
- two rotary bases (local for sliding layers, global for full ones): `position_embeddings`
  asks the rotary module for each layer type, as `Gemma3TextModel.forward` does;
- per-layer masks: the base adapter reads `config.layer_types` and `sliding_window`;
- final logit soft-capping (when the config sets it): `logits`.
The tokenizer adds BOS itself, and the end-of-turn token is an extra EOS id in the model's
generation_config, which the export records (`onnx_export._eos_ids`). Its 262k-token LM head
costs more than several layers: use gates, not full heads, at the exits.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Family


class Gemma3Family(Family):
    name = "gemma3_text"
    model_types = ("gemma3_text",)
    end_of_turn_tokens = ("<end_of_turn>",)

    def base(self) -> nn.Module:
        return self.model.model

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        rotary = self.base().rotary_emb
        return {t: rotary(hidden, position_ids, t) for t in dict.fromkeys(self.layer_types())}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap
