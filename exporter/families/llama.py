"""Llama and its close relatives: pre-norm RMSNorm blocks with RoPE and GQA.

Llama 3.x (rope scaling "llama3"), SmolLM, Qwen2, Qwen3 (q/k norms inside the attention) and
Mistral (sliding window on every layer) all differ only inside transformers' own layer and
rotary modules, or in which layers slide, which the base adapter reads from the config.
"""

from __future__ import annotations

from torch import nn

from .base import Family, UnsupportedArchitecture


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "qwen2", "qwen3", "mistral")

    def base(self) -> nn.Module:
        return self.model.model

    def kv_projection(self, index, hidden, position_ids):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2/3, Mistral: the same

        layer = self.layers[index]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        shape = (*h.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(h).view(shape)
        if getattr(attn, "k_norm", None) is not None:  # Qwen3: per-head RMSNorm on the keys before rotary
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = self.position_embeddings(h, position_ids)[self.layer_type(index)]
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

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

    def run_layer_buffer(self, index, hidden, past, seqlens_k, total, rope, pending=None):
        """The decoder layer written out so attention is one GroupQueryAttention node.

        Same computation as the transformers layer (pre-norm, q/k/v projections, Qwen3's per-head
        q/k norms where the layer has them, attention, o_proj, residual, post-norm MLP, residual);
        RoPE is applied inside the op from the cos/sin tables `rope`, after the q/k norms as in
        transformers. Each residual add is fused with the norm after it
        (SkipSimplifiedLayerNormalization, exporter/skip_norm.py): the MLP's output is handed
        back as `pending`, for the next layer's input norm to add (or the segment, after its
        last layer). Returns (hidden, (present_key, present_value), pending).
        """
        from ..gqa import gqa
        from ..skip_norm import skip_rms_norm

        layer = self.layers[index]
        attn = layer.self_attn
        if pending is None:
            h = layer.input_layernorm(hidden)
        else:
            h, hidden = skip_rms_norm(pending, hidden, layer.input_layernorm)
        q, k = attn.q_proj(h), attn.k_proj(h)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head's vector
            d = self.shape().head_dim
            q = attn.q_norm(q.view(*q.shape[:-1], -1, d)).flatten(-2)
            k = attn.k_norm(k.view(*k.shape[:-1], -1, d)).flatten(-2)
        out, pk, pv = gqa(q, k, attn.v_proj(h), past[0], past[1], seqlens_k, total,
                          *rope, num_heads=self.config.num_attention_heads, kv_heads=self.shape().num_kv_heads,
                          scale=attn.scaling)
        h, hidden = skip_rms_norm(attn.o_proj(out), hidden, layer.post_attention_layernorm)
        return hidden, (pk, pv), layer.mlp(h)
