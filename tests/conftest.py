"""Tiny random models of each supported family, built from configs (no files needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("LAMA_SHARED", Path(__file__).resolve().parents[2] / "shared"))  # worktrees: set LAMA_SHARED
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
    elif family == "llama_hd16":  # head size 16: the smallest GroupQueryAttention accepts (KV buffer layout)
        cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
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
    # the char tokenizer has no special tokens: the configs' default EOS ids (2, 0) would be
    # printable characters here, and the export records generation_config's EOS ids
    cfg.bos_token_id = cfg.eos_token_id = None
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


def char_tokenizer():
    """A real fast tokenizer for the tiny models: one token per printable character (97 ids).

    Built with `tokenizers` so it saves a tokenizer.json the runtime can read, like a real one.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): i for i in range(95)}
    vocab["\n"] = 95
    vocab["<unk>"] = 96
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
    "that he is considered the rightful property of some one or other of their daughters. "
) * 40


def tiny_backbone(family: str, seed: int = 0, layers: int = 4):
    from exporter.backbone import Backbone

    return Backbone.from_model(tiny_model(family, seed, layers), char_tokenizer())


def make_checkpoint(folder, family: str, exits=(1, 2, 3), thresholds=None, seed: int = 0, train_steps: int = 0):
    """A checkpoint of a tiny model (saved with save_pretrained so it reloads by path)."""
    import torch

    from exporter.checkpoint import CheckpointConfig, save_checkpoint, to_json_thresholds
    from exporter.heads import ExitHeads
    from exporter.recipes import ModelSource

    bb = tiny_backbone(family, seed)
    model_dir = Path(folder) / "model"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    heads = ExitHeads("adapter", list(exits), bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    for h in heads.heads:  # random, non-trivial adapters: the heads must differ from the logit lens
        torch.nn.init.normal_(h.up.weight, std=0.5)
    thresholds = [float("inf")] * len(exits) if thresholds is None else thresholds
    cfg = CheckpointConfig(source=ModelSource(str(model_dir)), exits=list(exits), num_layers=bb.shape.num_layers,
                           head="adapter", rank=4, thresholds=to_json_thresholds(thresholds),
                           policy={"kind": "target", "target": 0.95, "delta": None})
    return save_checkpoint(Path(folder) / "ckpt", cfg, heads), bb


# SmolLM2-135M-Instruct's chat template, copied from the GGUF's metadata (the default model's)
SMOLLM2_CHAT_TEMPLATE = Path(__file__).parent / "data" / "smollm2_chat_template.jinja"


@pytest.fixture(scope="session")
def chat_export(tmp_path_factory):
    """A tiny Llama export (default outputs: top-k logits, no full logits) whose tokenizer
    carries SmolLM2's chat template, so the template travels in the export as it does for SmolLM2."""
    from exporter import api

    d = tmp_path_factory.mktemp("chat")
    ckpt, bb = make_checkpoint(d, "llama")
    bb.tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE.read_text()
    return api.export(ckpt, out=d / "onnx", backbone=bb), bb
