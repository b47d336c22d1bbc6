"""Tiny random models of each supported family, built from configs (no files needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
HF_CACHE = SHARED / "hf-cache"
DATA = SHARED / "data"

# No hub is reachable: read real models from the shared cache only (set before transformers loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_CACHE", str(HF_CACHE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(family: str, seed: int = 0, layers: int = 4):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, initializer_range=0.2)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                            initializer_range=0.2)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=4, n_positions=256, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.eval()
    return model


FAMILIES = ["llama", "gpt_neox", "gpt2"]


@pytest.fixture(params=FAMILIES)
def family_name(request):
    return request.param


def stories_available() -> bool:
    return (HF_CACHE / "models--karpathy--stories260K").is_dir()


requires_stories = pytest.mark.skipif(
    not stories_available(), reason=f"real model karpathy/stories260K not found in {HF_CACHE}")
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"text data not found in {DATA}")


class CharTokenizer:
    """Stand-in tokenizer for tiny random models: one id per character (mod vocab)."""

    def __init__(self, vocab: int = 97):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [ord(c) % self.vocab for c in text]}


SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
    "that he is considered the rightful property of some one or other of their daughters. "
) * 40


def tiny_backbone(family: str, seed: int = 0, layers: int = 4):
    from exporter.backbone import Backbone

    return Backbone.from_model(tiny_model(family, seed, layers), CharTokenizer())
