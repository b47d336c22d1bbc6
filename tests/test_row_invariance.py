"""Row invariance: a position computes the same logits whether it runs alone or inside a
verification call of several positions, so exact decoding's tokens do not depend on its drafts.
Exports with the concat KV layout fold the query heads of a group into the rows of one product
(exporter/grouped_attention.py) and say so in the manifest (`row_invariant`): exact decoding
equals their one-position full path bit for bit. The KV buffer layout (GroupQueryAttention)
does not claim it; there exact decoding pads one-position calls (runtime/kv_buffer.py), so its
tokens are those of the full model with every call over >= 2 positions."""

import numpy as np
import pytest
import torch
from conftest import DATA, make_checkpoint, requires_data, requires_stories

from exporter import api
from exporter.grouped_attention import grouped_attention
from runtime import Runtime


def alone_vs_together(folder, prompt_len: int = 40, n: int = 6, seed: int = 1, pad: bool = False) -> float:
    """Max |logits| difference at the last of n positions after a prompt: fed one per call vs in
    one call (`pad`: the KV buffer cache's padding of one-position calls, as exact decoding sets it)."""
    rt = Runtime.load(folder)
    never = [float("inf")] * len(rt.manifest.segments)
    ids = np.random.default_rng(seed).integers(3, rt.manifest.model.vocab_size - 3, prompt_len + n)
    cache = rt.new_cache()
    if pad:
        cache.pad = True
    rt.step(ids[:prompt_len], cache, never)
    for t in ids[prompt_len:]:
        alone = rt.step(np.array([t]), cache, never, want_logits=True)[3]
    cache = rt.new_cache()
    rt.step(ids[:prompt_len], cache, never)
    together = rt.step(ids[prompt_len:], cache, never, want_logits=True)[3]
    a, b = np.asarray(alone), np.asarray(together)
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)):  # top-k logits (-inf elsewhere): another top-k
        return float("inf")
    return float(np.abs(a[finite] - b[finite]).max())


@pytest.mark.parametrize("family", ["llama_hd16", "gemma3_text", "qwen2"])
def test_concat_exports_compute_a_position_alike_in_any_call(tmp_path, family):
    ckpt, bb = make_checkpoint(tmp_path, family)
    folder = api.export(ckpt, out=tmp_path / "onnx", kv="concat", backbone=bb, with_logits=True)
    assert Runtime.load(folder).manifest.row_invariant
    assert alone_vs_together(folder) == 0.0  # bit for bit (transformers' eager attention: ~1e-06)
    from runtime.inspect_export import describe, render

    assert "exact decoding gives the full path's tokens bit for bit" in render(describe(folder))


def test_int4_concat_export_is_row_invariant(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16")
    folder = api.export(ckpt, out=tmp_path / "int4", kv="concat", precision="int4", backbone=bb, with_logits=True)
    assert Runtime.load(folder).manifest.row_invariant
    assert alone_vs_together(folder) == 0.0


def test_what_is_not_claimed_row_invariant(tmp_path):
    """GroupQueryAttention (buffer layout) computes a one-position call on another path; a
    model with one query head per key/value head has one row per decode call; accuracy level 0
    keeps float activations, whose kernel is not row-invariant either."""
    ckpt, bb = make_checkpoint(tmp_path / "llama", "llama_hd16")
    assert not Runtime.load(api.export(ckpt, out=tmp_path / "buffer", kv="buffer", kv_capacity=64,
                                       backbone=bb)).manifest.row_invariant
    assert not Runtime.load(api.export(ckpt, out=tmp_path / "level0", kv="concat", precision="int4", backbone=bb,
                                       quant_options={"accuracy_level": 0})).manifest.row_invariant
    ckpt, bb = make_checkpoint(tmp_path / "gpt2", "gpt2")
    assert not Runtime.load(api.export(ckpt, out=tmp_path / "mha", backbone=bb)).manifest.row_invariant


def test_grouped_attention_is_eager_attention():
    """The same arithmetic as transformers' eager attention (repeat the key/value heads), with
    a soft-cap and a causal mask; only the grouping of rows differs."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    torch.manual_seed(0)
    b, h, kv, s, t, d = 1, 8, 2, 5, 12, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = h // kv, d
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    mask = torch.zeros(b, 1, s, t)
    mask[..., -s:] = torch.triu(torch.full((s, s), torch.finfo(torch.float32).min), 1)
    for softcap in (None, 20.0):
        want, want_w = eager_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=softcap)
        got, got_w = grouped_attention(module, q, k, v, mask, scaling=0.3, softcap=softcap)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)


@pytest.mark.integration
@requires_stories
@requires_data
def test_real_model_int4_exact_decoding_is_bit_exact(tmp_path):
    """stories260K at int4 (concat layout): exact decoding's tokens equal the int4 full path's
    on every prompt, for drafts from lookup, the n-gram table and the exits, and the logits of a
    position are the same bits alone or verified with others."""
    import dataclasses

    from exporter.recipes import load_recipe

    recipe = load_recipe("stories260k")
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=60, train_tokens=20000,
                                                                   calib_tokens=6000, heldout_tokens=3000))
    ckpt = api.train(recipe, out=tmp_path / "ckpt", data=[DATA / "gutenberg"])
    folder = api.export(ckpt, out=tmp_path / "int4", precision="int4", with_logits=True)
    rt = Runtime.load(folder)
    assert rt.manifest.kv_cache.layout == "concat" and rt.manifest.row_invariant
    assert alone_vs_together(folder, prompt_len=30, n=8) == 0.0
    for prompt in ("Once upon a time, there was a little dog", "Lily and Ben went to the park. They",
                   "The sun was hot and the cat"):
        full = rt.generate(prompt, 48, thresholds="never", stop_at_eos=False)
        for th in ("never", [0.0] * len(rt.manifest.exits)):
            res = rt.generate(prompt, 48, thresholds=th, stop_at_eos=False, exact=True)
            assert res.tokens == full.tokens, (prompt, th)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_padded_buffer_calls_compute_a_position_alike(tmp_path, precision):
    """KV buffer layout (GroupQueryAttention): with `pad` (exact decoding), a one-position call
    also carries the position before it, so every call takes the many-row path and a position's
    logits are the same bits alone as inside a verification call."""
    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16")
    folder = api.export(ckpt, out=tmp_path / "buffer", kv="buffer", kv_capacity=128, precision=precision,
                        backbone=bb, with_logits=True)
    assert alone_vs_together(folder, pad=True) == 0.0


def test_exact_decoding_on_a_buffer_export_does_not_depend_on_drafts(tmp_path):
    """Exact decoding's tokens are those of the full model with every call over >= 2 positions
    (drafts="none"), whatever the drafts and exits; the kept rows follow rollbacks."""
    from test_drafting import Scripted

    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16")
    rt = Runtime.load(api.export(ckpt, out=tmp_path / "buffer", kv="buffer", kv_capacity=96, precision="int4",
                                 backbone=bb))
    prompt = "It is a truth universally acknowledged"
    ref = rt.generate(prompt, 40, thresholds="never", stop_at_eos=False, exact=True, drafts="none")
    assert ref.drafts()["steps"] == 40
    rng = np.random.default_rng(0)
    sequence = list(ref.prompt_tokens) + list(ref.tokens)
    vocab = rt.manifest.model.vocab_size
    for right in (99, 0, lambda k: int(rng.integers(0, k + 1))):
        for th in ("never", [0.0] * len(rt.manifest.exits)):
            res = rt.generate(prompt, 40, thresholds=th, stop_at_eos=False, exact=True,
                              drafts=[Scripted(sequence, right, vocab)])
            assert res.tokens == ref.tokens
    cache = rt.kept.cache
    assert all(max(rows) < cache.position for rows in cache.rows.values() if rows)
