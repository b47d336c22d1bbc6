"""One small adapter per model family: how to embed, run a decoder layer, and finish.

Everything else in the exporter (feature caching, heads, segment graphs) walks a model
through these few calls, so a family that follows them works end to end. Adding a family
is one subclass plus a line in `FAMILIES`. The calls follow transformers 5.24
(see ../shared/KNOWN.md): layers take `cache=` (GPT-NeoX: `layer_past=`) and return a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def causal_mask(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, P+S) additive mask from a (B, P+S) 0/1 padding mask.

    Query i (absolute position P+i) sees key j when j <= P+i and key j is not padding.
    Written with arange/comparisons only so it traces into ONNX with dynamic P and S.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    q = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + past  # (S, 1)
    k = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # (1, P+S)
    allowed = (k <= q).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, S, P+S)
    neg = torch.finfo(dtype).min
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype)).unsqueeze(1)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int


class Family:
    """Base adapter. Subclasses name the submodules; the calls are shared where they can be."""

    name = "base"
    model_types: tuple[str, ...] = ()

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

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.base().rotary_emb(hidden, position_ids)

    def run_layer(self, index: int, hidden, mask, position_ids, pos_emb, cache) -> torch.Tensor:
        out = self.layers[index](hidden, attention_mask=mask, position_ids=position_ids,
                                 position_embeddings=pos_emb, cache=cache, use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))

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

    def run_layer_buffer(self, index: int, hidden, past: tuple, seqlens_k, total, rope: tuple):
        """Decoder layer `index` with its attention on the KV buffers `past` (see gqa.py):
        returns (hidden, (present_key, present_value)). Families that support it override this."""
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


class LlamaFamily(Family):
    """Llama, SmolLM, Qwen2, Mistral: pre-norm RMSNorm blocks with RoPE and GQA.

    Only with full attention: configs with a sliding window are refused (`check_attention`).
    """

    name = "llama"
    model_types = ("llama", "qwen2", "mistral")

    def base(self) -> nn.Module:
        return self.model.model

    def check_kv_buffer(self) -> None:
        windowed = [i for i, layer in enumerate(self.layers)
                    if getattr(layer.self_attn, "sliding_window", None) is not None]
        if windowed or (self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None)):
            raise UnsupportedArchitecture(
                "--kv buffer does not support sliding-window attention yet (layers "
                f"{windowed or 'all'}); export with --kv concat")
        head_dim = self.shape().head_dim
        if head_dim % 16:
            raise UnsupportedArchitecture(f"--kv buffer needs a head size that is a multiple of 16 "
                                          f"(GroupQueryAttention); this model's is {head_dim}")
        rope = getattr(self.config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "dynamic":
            raise UnsupportedArchitecture("--kv buffer needs fixed RoPE tables; dynamic RoPE scaling is not supported")

    def run_layer_buffer(self, index, hidden, past, seqlens_k, total, rope):
        """The decoder layer written out so attention is one GroupQueryAttention node.

        Same computation as the transformers layer (pre-norm, q/k/v projections, attention,
        o_proj, residual, post-norm MLP, residual); RoPE is applied inside the op from the
        cos/sin tables `rope`. Returns the hidden states and the (present_key, present_value) buffers.
        """
        from .gqa import gqa

        layer = self.layers[index]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        out, pk, pv = gqa(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), past[0], past[1], seqlens_k, total,
                          *rope, num_heads=self.config.num_attention_heads, kv_heads=self.shape().num_kv_heads,
                          scale=attn.scaling)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, (pk, pv)


class GPTNeoXFamily(Family):
    """GPT-NeoX / Pythia: parallel attention+MLP, partial RoPE, `layer_past=` cache argument."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)

    def base(self) -> nn.Module:
        return self.model.gpt_neox

    @property
    def final_norm(self) -> nn.Module:
        return self.base().final_layer_norm

    def embed(self, input_ids, position_ids):
        return self.base().embed_in(input_ids)

    def run_layer(self, index, hidden, mask, position_ids, pos_emb, cache):
        out = self.layers[index](hidden, attention_mask=mask, position_ids=position_ids,
                                 position_embeddings=pos_emb, layer_past=cache, use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out


class GPT2Family(Family):
    """GPT-2: learned absolute positions added at the embedding, no RoPE."""

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
        return None

    def run_layer(self, index, hidden, mask, position_ids, pos_emb, cache):
        out = self.layers[index](hidden, cache=cache, attention_mask=mask, use_cache=cache is not None)
        return out[0] if isinstance(out, tuple) else out

    def shape(self) -> ModelShape:
        c = self.config
        return ModelShape(c.n_layer, c.n_embd, c.n_head, c.n_embd // c.n_head, c.vocab_size, c.n_positions)


FAMILIES: tuple[type[Family], ...] = (LlamaFamily, GPTNeoXFamily, GPT2Family)


def check_attention(config) -> None:
    """Refuse sliding-window attention (Mistral, Qwen2 with use_sliding_window, any config whose
    `sliding_window` is shorter than its context, or whose `layer_types` name sliding layers).

    Segments and `Backbone.forward` build one plain causal mask for every layer; a sliding
    window would need per-layer masks. Accepting such a model would match it only up to the
    window and then diverge silently, so it is an error until the window is supported.
    """
    window = getattr(config, "sliding_window", None)
    context = getattr(config, "max_position_embeddings", None)
    sliding_layers = [i for i, t in enumerate(getattr(config, "layer_types", None) or ()) if "sliding" in str(t)]
    if (window is not None and (context is None or window < context)) or sliding_layers:
        arch = ", ".join(getattr(config, "architectures", None) or [str(getattr(config, "model_type", "?"))])
        raise UnsupportedArchitecture(
            f"{arch} uses sliding-window attention (sliding_window={window}, context {context}"
            + (f", sliding layers {sliding_layers}" if sliding_layers else "") + "); LAMA's segments use a full "
            "causal mask, so past the window they would silently diverge from the model. Not supported yet; "
            "a config with sliding_window=None (or >= its context) and no sliding layers is fine.")


def family_for(model: nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            check_attention(model.config)
            return fam(model)
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    raise UnsupportedArchitecture(
        f"unsupported architecture {arch} (model_type={model_type!r}); supported model types: {supported}"
    )
