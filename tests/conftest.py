"""Tiny random models of each supported family, built from configs (no files needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared beside the checkout; LAMA_SHARED overrides it (a git worktree elsewhere, CI)
SHARED = Path(os.environ.get("LAMA_SHARED") or Path(__file__).resolve().parents[2] / "shared")
HF_CACHE = SHARED / "hf-cache"
DATA = SHARED / "data"

# No hub is reachable: read real models from the shared cache only (set before transformers loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_CACHE", str(HF_CACHE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the device CLI's default thread pool is onnxruntime's process-wide shared one, which then
# refuses every later session that asks for its own pool: tests run the CLI in this process,
# beside exporters and sessions of their own
os.environ.setdefault("LAMA_THREAD_POOL", "session")


WINDOW = 5  # sliding window of the tiny sliding-window configs: the conformance prompts are longer


def tiny_config(case: str, layers: int = 4):
    """A tiny random config per conformance case (a family, or a family variant such as llama3)."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    if case == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if case == "llama_hd16":  # head size 16: the smallest GroupQueryAttention accepts (KV buffer layout)
        return tf.LlamaConfig(**{**common, "hidden_size": 64}, tie_word_embeddings=True)
    if case == "llama3":  # Llama 3.x rope scaling; head size 16 so the KV buffer layout applies too
        return tf.LlamaConfig(**common, head_dim=16, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if case == "qwen2":  # sliding window on the layers from max_window_layers on, as Qwen2 does
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=layers // 2)
    if case == "qwen3":  # q/k norms; head size 16 so the KV buffer layout applies too
        return tf.Qwen3Config(**common, head_dim=16)
    if case == "mistral":  # every layer slides
        return tf.MistralConfig(**common, sliding_window=WINDOW)
    if case == "gemma3_text":  # local/global layers, two rotary bases, soft-capped logits, (1+w) norms
        return tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                   layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
                                   final_logit_softcapping=30.0)
    if case == "phi3":  # fused qkv / gate_up, sliding window, longrope (short factors below 64 positions)
        return tf.Phi3Config(**common, sliding_window=WINDOW, pad_token_id=None, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": 64})
    if case == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                                initializer_range=0.2)
    if case == "gpt2":
        return tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                             initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    raise ValueError(case)


def tiny_model(family: str, seed: int = 0, layers: int = 4):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    # the char tokenizer has no special tokens: the configs' default EOS ids (2, 0) would be
    # printable characters here, and the export records generation_config's EOS ids
    cfg.bos_token_id = cfg.eos_token_id = None
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.eval()
    return model


# one line per family in the registry (tests/test_families.py checks that none is missing)
CONFORMANCE = ["llama", "llama3", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "gpt_neox", "gpt2"]
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


def make_checkpoint(folder, family: str, exits=(1, 2, 3), thresholds=None, seed: int = 0, train_steps: int = 0,
                    gate_width: int | None = None, layers: int = 4, gates: bool = False):
    """A checkpoint of a tiny model (saved with save_pretrained so it reloads by path); with
    `gate_width` (or gates=True: width 8), random (untrained) exit gates too and confidence 'gate'."""
    import torch

    from exporter.checkpoint import CheckpointConfig, save_checkpoint
    from exporter.data import window_hashes
    from runtime.manifest import to_json_thresholds
    from exporter.heads import ExitHeads
    from exporter.recipes import ModelSource

    bb = tiny_backbone(family, seed, layers)
    model_dir = Path(folder) / "model"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    heads = ExitHeads("adapter", list(exits), bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    for h in heads.heads:  # random, non-trivial adapters: the heads must differ from the logit lens
        torch.nn.init.normal_(h.up.weight, std=0.5)
    if gates and gate_width is None:
        gate_width = 8
    gate_modules = None
    if gate_width:
        from exporter.gates import ExitGates

        gate_modules = ExitGates(len(exits), bb.shape.hidden_size, gate_width)
    scores = checkpoint_scores(bb, heads, gate_modules)
    thresholds = [float("inf")] * len(exits) if thresholds is None else thresholds
    text_file = Path(folder) / "text.txt"  # the windows' text and how they were drawn, as `lama train` records them
    text_file.write_text(SAMPLE_TEXT, encoding="utf-8")
    train_record = {"config": {"seq_len": 32, "seed": 0, **{f"{s}_tokens": n for s, n in SCORE_TOKENS.items()}},
                    "data": [str(text_file)], "windows_sha256": window_hashes(score_splits(bb))}
    cfg = CheckpointConfig(source=ModelSource(str(model_dir)), exits=list(exits), num_layers=bb.shape.num_layers,
                           train=train_record,
                           head="adapter", rank=4, thresholds=to_json_thresholds(thresholds),
                           policy={"kind": "target", "target": 0.95, "delta": None},
                           confidence="gate" if gate_width else "top1", gate_width=gate_width)
    return save_checkpoint(Path(folder) / "ckpt", cfg, heads, scores, gates=gate_modules), bb


SCORE_TOKENS = {"train": 0, "calib": 640, "heldout": 320}  # the windows make_checkpoint scores


def score_splits(bb) -> dict:
    """The windows of SAMPLE_TEXT make_checkpoint draws, as Checkpoint.splits redraws them."""
    from exporter.data import make_splits

    return make_splits([SAMPLE_TEXT], bb.tokenizer, 32, SCORE_TOKENS)


def checkpoint_scores(bb, heads, gates=None) -> dict:
    """Calibration and held-out scores as `lama train` stores them (a few windows of SAMPLE_TEXT):
    an export builds its per-target threshold table from them."""
    from exporter.checkpoint import scores_file
    from exporter.train import cache_features, exit_scores, gate_scores

    splits = score_splits(bb)
    out = {}
    for split, name in (("calib", "calibration"), ("heldout", "heldout")):
        feats = cache_features(bb, splits[split], heads.exits)
        out[scores_file(name)] = exit_scores(bb, heads, feats)
        if gates is not None:
            out[scores_file(name, "gate")] = gate_scores(out[scores_file(name)], bb, heads, feats, gates)
    return out


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


def torch_early_exit(bb, heads, prompt: list[int], n: int, thresholds: list[float]):
    """Reference for the runtime's early-exit rule, in PyTorch with no cache at all: every step
    runs the whole model on the whole sequence, and the token leaves at the first exit whose
    top-1 confidence reaches its threshold (else the full model's argmax). With exact (defer)
    caches the runtime must give the same tokens, exits and confidences.

    Returns (tokens, exit indices, confidences), the last exit index meaning the full model.
    """
    import torch

    from exporter.heads import confidence

    ids, tokens, exits, confs = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(n):
            captured, logits = bb.forward(torch.tensor([ids]), capture=heads.exits)
            choice = None
            for k, layer in enumerate(heads.exits):
                tok, conf = confidence(heads.logits(k, captured[layer][0, -1]), "top1")
                if float(conf) >= thresholds[k]:
                    choice = (int(tok), k, float(conf))
                    break
            if choice is None:
                tok, conf = confidence(logits[0, -1], "top1")
                choice = (int(tok), len(heads.exits), float(conf))
            tokens.append(choice[0])
            exits.append(choice[1])
            confs.append(choice[2])
            ids.append(choice[0])
    return tokens, exits, confs


def decode_against_pytorch(rt, bb, prompt: str, steps: int):
    """Greedy decode `steps` tokens one step at a time with every exit off; each step must decide
    in the last segment and give the PyTorch model's argmax. Returns (the largest logit gap to a
    full forward pass, the ids, the cache)."""
    import numpy as np
    import torch

    cache = rt.new_cache()
    ids = rt.encode(prompt).tolist()
    x, worst = np.array(ids), 0.0
    for _ in range(steps):
        tok, j, _, logits = rt.step(x, cache, rt.resolve_thresholds("never"), want_logits=True)
        assert j == len(rt.manifest.segments) - 1
        with torch.no_grad():
            ref = bb.model(torch.tensor([ids])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(logits[0] - ref).max()))
        assert tok == int(ref.argmax())
        ids.append(tok)
        x = np.array([tok])
    return worst, ids, cache
