"""The family adapter's base: how to embed, build each layer's mask and rotary table, run a
decoder layer, and finish.

Everything else in the exporter (feature caching, heads, segment graphs) walks a model
through these few calls, so a family that follows them works end to end. What differs per
layer (global vs sliding-window attention, Gemma 3's local/global rotary bases) is keyed by
the layer's type ("full_attention" / "sliding_attention", transformers' own names): masks and
position embeddings are dicts from layer type to tensor, and `run_layer` picks its layer's.
The calls follow transformers 5.24 (see ../shared/KNOWN.md): layers take `cache=`
(GPT-NeoX: `layer_past=`) and return a tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.manifest import ModelShape


class UnsupportedArchitecture(ValueError):
    pass


class LayerCache:
    """The smallest object a transformers layer accepts as its KV cache.

    Layers only call `update(k, v, layer_idx, ...)`; we concatenate the given past with
    the new keys/values and remember the result as this segment's `present`. Plain
    tensors in and out keep the ONNX graph free of transformers' cache classes.
    """

    def __init__(self, first_layer: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.first_layer = first_layer
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        i = layer_idx - self.first_layer
        if self.past is not None:
            pk, pv = self.past[i]
            key = torch.cat([pk, key], dim=2)  # (B, kv_heads, past + S, head_dim)
            value = torch.cat([pv, value], dim=2)
        self.present[i] = (key, value)
        return key, value

    def presents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.present[i] for i in sorted(self.present)]


FULL, SLIDING = "full_attention", "sliding_attention"


def causal_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype,
                window: int | None = None) -> torch.Tensor:
    """(B, 1, S, P+S) additive mask from a (B, P+S) 0/1 padding mask.

    Query i (cache index P+i) sees key j when j <= P+i and key j is not padding; with a
    sliding `window` also only when j > P+i - window (transformers' `sliding_window_overlay`,
    on cache indices as there). The KV cache keeps every position and this mask hides the old
    ones, which is exact. Written with arange/comparisons only so it traces into ONNX with
    dynamic P and S.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    q = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + past  # (S, 1)
    k = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # (1, P+S)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, S, P+S)
    neg = torch.finfo(dtype).min
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype)).unsqueeze(1)


class Family:
    """Base adapter. Subclasses name the submodules; the calls are shared where they can be."""

    name = "base"
    model_types: tuple[str, ...] = ()
    end_of_turn_tokens: tuple[str, ...] = ()  # chat turn ends the export adds to the EOS ids, if in the vocab

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- submodules -----------------------------------------------------------------
    def base(self) -> nn.Module:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        return self.base().layers

    @property
    def final_norm(self) -> nn.Module:
        return self.base().norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # -- calls ------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.base().embed_tokens(input_ids)

    def layer_types(self) -> list[str]:
        """Each layer's attention kind: transformers' `config.layer_types` where the config has
        it (Gemma 3, Qwen2/3), else sliding everywhere when `config.sliding_window` is set
        (Mistral, Phi-3), else full everywhere."""
        c = self.config
        n = self.shape().num_layers
        types = getattr(c, "layer_types", None)
        if types:
            return list(types[:n])
        return [SLIDING if getattr(c, "sliding_window", None) else FULL] * n

    def layer_type(self, index: int) -> str:
        return self.layer_types()[index]

    def attention_masks(self, attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> dict:
        """{layer type: additive mask} for the layer types this model has."""
        window = getattr(self.config, "sliding_window", None)
        return {t: causal_mask(attention_mask, seq_len, dtype, window if t == SLIDING else None)
                for t in dict.fromkeys(self.layer_types())}

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """{layer type: what the layer takes as `position_embeddings`}; one rotary table for all here."""
        pe = self.base().rotary_emb(hidden, position_ids)
        return dict.fromkeys(self.layer_types(), pe)

    def run_layer(self, index: int, hidden, masks: dict, position_ids, pos_embs: dict, cache) -> torch.Tensor:
        t = self.layer_type(index)
        out = self.layers[index](hidden, attention_mask=masks[t], position_ids=position_ids,
                                 position_embeddings=pos_embs[t], cache=cache, use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))

    # -- K/V fill (the fill KV policy) ---------------------------------------------------
    def kv_projection(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values layer `index` would cache for input `hidden` (B, S, D) at
        `position_ids`: its input norm, K/V projections (and key norm) and rotary embedding, no
        attention and no MLP. Each (B, kv_heads, S, head_dim). The fill policy's whole cost.
        Families that support the fill policy override this."""
        raise UnsupportedArchitecture(f"the fill KV policy (K/V projections alone) is not implemented for the "
                                      f"{self.name} family")

    def has_kv_projection(self) -> bool:
        return type(self).kv_projection is not Family.kv_projection

    # -- KV buffer (GroupQueryAttention) ---------------------------------------------------
    def check_kv_buffer(self) -> None:
        """Raise if this family's attention cannot run through GroupQueryAttention."""
        raise UnsupportedArchitecture(
            f"--kv buffer (GroupQueryAttention on a preallocated KV buffer) is not implemented for the "
            f"{self.name} family; export it with --kv concat")

    def rope_cache(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (length, head_dim/2) for positions 0..length-1, from the model's own rotary module."""
        rotary = self.base().rotary_emb
        pos = torch.arange(length).unsqueeze(0)
        cos, sin = rotary(torch.zeros((), dtype=torch.float32), pos)  # (1, length, head_dim), halves repeated
        half = cos.shape[-1] // 2
        return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()

    def run_layer_buffer(self, index: int, hidden, past: tuple, seqlens_k, total, rope: tuple, pending=None):
        """Decoder layer `index` with its attention on the KV buffers `past` (see gqa.py):
        returns (hidden, (present_key, present_value), pending), where `pending` is a residual
        term not yet added to `hidden` (None if none): the next layer takes it and fuses the add
        with its input norm (skip_norm.py); the segment adds what is left after its last layer.
        Families that support it override this."""
        self.check_kv_buffer()
        raise NotImplementedError

    def shape(self) -> ModelShape:
        c = self.config
        heads = c.num_attention_heads
        return ModelShape(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            max_context=getattr(c, "max_position_embeddings", None) or 2048,
        )
