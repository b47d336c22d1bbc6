"""Heads learn the full model's predictions; calibration meets its target; checkpoints round-trip."""

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_backbone

from exporter import api
from exporter.checkpoint import load_heads, read_config, read_scores
from exporter.data import make_splits
from exporter.heads import ExitHeads, confidence
from exporter.recipes import ModelSource, Recipe, TrainConfig
from exporter.train import cache_features, check_exits, exit_scores, train_heads

CFG = TrainConfig(head="adapter", rank=8, seq_len=32, train_tokens=3000, calib_tokens=1500,
                  heldout_tokens=600, steps=60, batch_tokens=256, lr=1e-2, seed=0)


def recipe(exits=(1, 2, 3), **kw):
    return Recipe(name="tiny", source=ModelSource("tiny"), exits=list(exits), train=TrainConfig(**{**CFG.__dict__, **kw}))


@pytest.mark.parametrize("head", ["adapter", "full"])
def test_heads_agree_more_after_training(family_name, head):
    bb = tiny_backbone(family_name)
    splits = make_splits([SAMPLE_TEXT], bb.tokenizer, 32, {"train": 3000, "calib": 600, "heldout": 600})
    heads = ExitHeads(head, [1, 2, 3], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=8)
    feats = cache_features(bb, splits["train"], [1, 2, 3])
    held = cache_features(bb, splits["heldout"], [1, 2, 3])
    before = exit_scores(bb, heads, held).agree.mean(0)
    report = train_heads(bb, heads, feats, CFG)
    after = exit_scores(bb, heads, held).agree.mean(0)
    assert report.loss_last < report.loss_first
    assert after.mean() > before.mean() + 0.05, (before, after)
    # the frozen backbone did not move
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_training_is_deterministic():
    outs = []
    for _ in range(2):
        bb = tiny_backbone("llama")
        splits = make_splits([SAMPLE_TEXT], bb.tokenizer, 32, {"train": 1000, "calib": 300, "heldout": 300})
        heads = ExitHeads("adapter", [2], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
        train_heads(bb, heads, cache_features(bb, splits["train"], [2]), TrainConfig(steps=10, batch_tokens=64, seed=3))
        outs.append(heads.heads[0].up.weight.clone())
    assert torch.equal(outs[0], outs[1])


def test_train_checkpoint_roundtrip(tmp_path):
    bb = tiny_backbone("gpt_neox")
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    ckpt = api.train(recipe(), out=tmp_path / "ck", data=[text], backbone=bb, target=0.9)
    cfg = read_config(ckpt)
    assert cfg.exits == [1, 2, 3] and cfg.head == "adapter" and len(cfg.thresholds) == 3
    # the target holds on held-out text (on the calibration set it holds by construction)
    assert cfg.calibration["heldout"]["agreement"] >= 0.9 - 0.05
    # heads loaded on a freshly built backbone reproduce the scores the trained heads computed
    fresh = tiny_backbone("gpt_neox")
    splits = make_splits([SAMPLE_TEXT], fresh.tokenizer, CFG.seq_len, {"train": CFG.train_tokens,
                         "calib": CFG.calib_tokens, "heldout": CFG.heldout_tokens}, seed=CFG.seed)
    feats = cache_features(fresh, splits["heldout"], [1, 2, 3])
    stored = read_scores(ckpt, "heldout")
    got = exit_scores(fresh, load_heads(ckpt, fresh), feats)
    np.testing.assert_allclose(got.confidence, stored.confidence, rtol=0, atol=1e-6)
    assert np.array_equal(got.agree, stored.agree) and stored.agree.mean() > 0.05
    # scores round-trip too, and re-calibrating from them reproduces the stored thresholds
    reports = api.calibrate(ckpt, target=0.9)
    assert read_config(ckpt).thresholds == cfg.thresholds
    assert reports["calibration"].agreement >= 0.9
    assert read_scores(ckpt, "heldout").num_tokens > 0


def test_checkpoint_heads_match_trained_outputs(tmp_path):
    from exporter.checkpoint import CheckpointConfig, save_checkpoint

    bb = tiny_backbone("gpt2")
    heads = ExitHeads("adapter", [1, 3], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    torch.nn.init.normal_(heads.heads[1].up.weight)
    cfg = CheckpointConfig(source=ModelSource("tiny"), exits=[1, 3], num_layers=4, head="adapter", rank=4,
                           thresholds=[0.5, None])
    save_checkpoint(tmp_path / "ck", cfg, heads)
    loaded = load_heads(tmp_path / "ck", bb)
    h = torch.randn(3, 7, bb.shape.hidden_size)
    for k in range(2):
        torch.testing.assert_close(loaded.logits(k, h), heads.logits(k, h), rtol=0, atol=0)
    assert read_config(tmp_path / "ck").threshold_values() == [0.5, float("inf")]


def test_confidence_kinds():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    tok, top1 = confidence(logits, "top1")
    _, margin = confidence(logits, "margin")
    assert tok.item() == 0
    assert top1.item() == pytest.approx(0.6, abs=1e-6) and margin.item() == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(ValueError, match="unknown confidence"):
        confidence(logits, "entropy-ish")


def test_bad_inputs():
    from transformers import AutoModelForCausalLM, OPTConfig

    from exporter.backbone import Backbone
    from exporter.families import UnsupportedArchitecture

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     ffn_dim=32, num_attention_heads=2))
    with pytest.raises(UnsupportedArchitecture, match="OPTForCausalLM"):
        Backbone.from_model(opt)
    with pytest.raises(ValueError, match="exit index out of range"):
        check_exits([2, 4], num_layers=4)
    with pytest.raises(ValueError, match="exit index out of range"):
        check_exits([0], num_layers=4)
    bb = tiny_backbone("llama")
    with pytest.raises(ValueError, match="empty"):
        make_splits(["", "   \n"], bb.tokenizer, 32, {"train": 100})
    with pytest.raises(ValueError, match="target"):
        api.train(recipe(), out="/nonexistent/never", data=[], backbone=bb, target=1.5)
    with pytest.raises(ValueError, match="unknown head kind"):
        ExitHeads("huge", [1], 8, torch.nn.Identity(), torch.nn.Identity())
