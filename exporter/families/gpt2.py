"""GPT-2: learned absolute positions added at the embedding, no RoPE."""

from __future__ import annotations

from torch import nn

from .base import Family, ModelShape


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)

    def base(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self.base().h

    @property
    def final_norm(self) -> nn.Module:
        return self.base().ln_f

    def embed(self, input_ids, position_ids):
        b = self.base()
        return b.wte(input_ids) + b.wpe(position_ids)

    def position_embeddings(self, hidden, position_ids):
        return dict.fromkeys(self.layer_types())

    def kv_projection(self, index, hidden, position_ids):
        attn = self.layers[index].attn
        h = self.layers[index].ln_1(hidden)
        _, k, v = attn.c_attn(h).split(attn.split_size, dim=2)
        shape = (*h.shape[:-1], -1, attn.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def run_layer(self, index, hidden, masks, position_ids, pos_embs, cache):
        out = self.layers[index](hidden, cache=cache, attention_mask=masks[self.layer_type(index)],
                                 use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out

    def shape(self) -> ModelShape:
        c = self.config
        return ModelShape(c.n_layer, c.n_embd, c.n_head, c.n_embd // c.n_head, c.vocab_size, c.n_positions)
