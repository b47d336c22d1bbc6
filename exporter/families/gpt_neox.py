"""GPT-NeoX / Pythia: parallel attention+MLP, partial RoPE, `layer_past=` cache argument."""

from __future__ import annotations

from torch import nn

from .base import Family


class GPTNeoXFamily(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)

    def base(self) -> nn.Module:
        return self.model.gpt_neox

    @property
    def final_norm(self) -> nn.Module:
        return self.base().final_layer_norm

    def embed(self, input_ids, position_ids):
        return self.base().embed_in(input_ids)

    def kv_projection(self, index, hidden, position_ids):
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb  # partial rotary

        layer = self.layers[index]
        attn = layer.attention
        h = layer.input_layernorm(hidden)
        qkv = attn.query_key_value(h).view(*h.shape[:-1], -1, 3 * attn.head_size).transpose(1, 2)
        _, k, v = qkv.chunk(3, dim=-1)
        cos, sin = self.position_embeddings(h, position_ids)[self.layer_type(index)]
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def run_layer(self, index, hidden, masks, position_ids, pos_embs, cache):
        t = self.layer_type(index)
        out = self.layers[index](hidden, attention_mask=masks[t], position_ids=position_ids,
                                 position_embeddings=pos_embs[t], layer_past=cache, use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out
