"""Real model from ../shared/hf-cache (karpathy/stories260K) and real text from ../shared/data."""

import numpy as np
import pytest
import torch
from conftest import DATA, requires_data, requires_stories

from exporter import api
from exporter.checkpoint import read_config
from exporter.recipes import load_recipe
from runtime import Runtime

pytestmark = [pytest.mark.integration, requires_stories, requires_data]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    import dataclasses

    d = tmp_path_factory.mktemp("stories")
    recipe = load_recipe("stories260k")
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=150, train_tokens=30000,
                                                                   calib_tokens=10000, heldout_tokens=5000))
    ckpt = api.train(recipe, out=d / "ckpt", data=[DATA / "gutenberg"])
    return ckpt, api.export(ckpt, out=d / "onnx", with_logits=True)


def test_real_model_training_and_calibration(stories):
    cfg = read_config(stories[0])
    before, after = np.array(cfg.train["agreement_before"]), np.array(cfg.train["agreement_after"])
    assert after.mean() > before.mean()
    assert cfg.calibration["calibration"]["agreement"] >= 0.95
    assert cfg.calibration["heldout"]["agreement"] >= 0.93  # held-out text: close to the target


def test_real_model_chain_parity(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("karpathy/stories260K")
    tok = AutoTokenizer.from_pretrained("karpathy/stories260K")
    rt = Runtime.load(stories[1])
    prompt = "Once upon a time, there was a little dog"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert rt.encode(prompt).tolist() == ids[0].tolist()  # the runtime's tokenizer matches transformers'
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    ref = out.sequences[0, ids.shape[1]:].tolist()
    res = rt.generate(prompt, 32, thresholds="never", stop_at_eos=False)
    assert list(res.tokens) == ref
    cache, th, x = rt.new_cache(), rt.resolve_thresholds("never"), rt.encode(prompt)
    for t in range(32):
        tokn, _, _, logits = rt.step(x, cache, th, want_logits=True)
        assert np.abs(logits[0] - out.logits[t][0].numpy()).max() < 1e-3
        x = np.array([tokn])


def test_real_model_exits_save_layers(stories):
    rt = Runtime.load(stories[1])
    res = rt.generate("Once upon a time", 48, thresholds=0.9, stop_at_eos=False)
    assert res.mean_layers < rt.manifest.model.num_layers


@pytest.mark.parametrize("max_pending", [2, 64])
def test_real_model_exact_mode_equals_full_greedy(stories, max_pending):
    """Exact mode reproduces the full model's greedy tokens for any thresholds, including
    thresholds that send every token out at the first exit (a rollback on most tokens)."""
    rt = Runtime.load(stories[1], max_pending=max_pending)
    inf = float("inf")
    for prompt in ("Once upon a time, there was a little dog", "Lily and Ben went to the park. They"):
        full = rt.generate(prompt, 40, thresholds="never", stop_at_eos=False)
        for th in (0.9, 0.8, [0.0] * 4, [0.3] * 4, [inf, 0.0, inf, 0.5]):
            res = rt.generate(prompt, 40, thresholds=th, stop_at_eos=False, exact=True)
            assert res.tokens == full.tokens, (prompt, th)
            if th == [0.0] * 4:  # exits as the only drafts (a step with table/lookup drafts runs them deep)
                alone = rt.generate(prompt, 40, thresholds=th, stop_at_eos=False, exact=True, drafts="none")
                assert alone.tokens == full.tokens and alone.work()["rollbacks"] >= 10


def test_real_model_ngram_drafts_are_exact_and_accepted(stories):
    """`lama train` leaves the model's own n-gram table in the checkpoint, the export carries it
    (checked like every file), and exact decoding drafts from it: the full model's tokens, with
    drafts accepted (stories260K's own continuations repeat its training stories' phrases)."""
    from exporter.checkpoint import NGRAM

    ckpt, folder = stories
    assert (ckpt / NGRAM).is_file() and (folder / NGRAM).is_file()
    rt = Runtime.load(folder)
    assert rt.manifest.ngram.file == NGRAM and "ngram" in rt.draft_sources
    prompt = "Once upon a time, there was a little dog"
    full = rt.generate(prompt, 40, thresholds="never", stop_at_eos=False)
    res = rt.generate(prompt, 40, thresholds="never", stop_at_eos=False, exact=True, drafts="ngram")
    assert res.tokens == full.tokens
    src = res.drafts()["sources"]["ngram"]
    assert src["drafted"] > 0 and src["accepted"] > 0
    both = rt.generate(prompt, 40, stop_at_eos=False, exact=True)  # every source: lookup, then the table
    assert both.tokens == full.tokens
