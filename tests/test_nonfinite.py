"""Issue 30: hidden states past float16's range are cached without overflow, and a NaN or
infinite loss, score or threshold stops training, gate fitting and calibration with a
message that names the exit and the step, before any checkpoint is written.

On the real model (`lama train gemma3-270m --out DIR --train-tokens 8192 --steps 60`): before,
numpy warned "overflow encountered in cast" and the loss was nan from step 1; now the train
cache falls back to bfloat16 (|h| = 8.8e4 after layer 12) and the mean per-exit loss goes
9.217 (step 1) -> 3.927 (mean of the last 10 steps)."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_backbone

from exporter import api
from exporter.cache import CACHE_VERSION, FLOAT16_MAX, META, cache_features, load_features
from exporter.calibrate import calibrate_thresholds, check_thresholds
from exporter.data import make_splits
from exporter.gates import ExitGates, train_gates
from exporter.heads import ExitHeads
from exporter.recipes import ModelSource, Recipe, TrainConfig
from exporter.scores import ExitScores, NonFiniteError
from exporter.train import exit_scores, train_heads

SCALE = 1e5  # the tiny Gemma's residual stream times this: elements ~1e5, past float16's 65,504
CFG = TrainConfig(head="adapter", rank=8, seq_len=32, train_tokens=1500, calib_tokens=600, heldout_tokens=300,
                  steps=40, batch_tokens=256, lr=1e-2, seed=0, gate_steps=20)


def big_gemma(scale: float = SCALE):
    """A tiny random Gemma 3 whose residual stream is `scale` times larger and that computes the
    same logits: the embeddings and each layer's post-norms (which write into the stream) are
    scaled; every read of the stream goes through a norm, which ignores the scale (as Gemma's
    own large activations do)."""
    bb = tiny_backbone("gemma3_text")
    base = bb.model.model
    with torch.no_grad():
        base.embed_tokens.embed_scale.mul_(scale)
        for layer in base.layers:
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.copy_((1 + norm.weight) * scale - 1)  # Gemma's norms multiply by (1 + w)
    return bb


def windows(bb, tokens=600):
    return make_splits([SAMPLE_TEXT], bb.tokenizer, 32, {"train": tokens, "calib": 10, "heldout": 10})["train"]


def own_states(bb, win, layers):
    """The model's own (transformers') hidden states after `layers`, float32, (T, D) each."""
    with torch.no_grad():
        out = bb.model(torch.from_numpy(win.ids), output_hidden_states=True)
    return {layer: out.hidden_states[layer].reshape(-1, bb.shape.hidden_size).numpy() for layer in layers}


def test_gemma_states_past_float16_are_cached_as_bfloat16(tmp_path):
    bb, small = big_gemma(), tiny_backbone("gemma3_text")
    win = windows(bb)
    ref = own_states(bb, win, [1, 3])
    assert np.abs(ref[1]).max() > FLOAT16_MAX  # float16 could not hold these: the old cache wrote inf
    with torch.no_grad():  # the scaling leaves the model's function alone
        ids = torch.from_numpy(win.ids[:2])
        torch.testing.assert_close(bb.model(ids).logits, small.model(ids).logits, rtol=0, atol=1e-3)

    feats = cache_features(bb, win, [1, 3], folder=tmp_path / "c", dtype="float16")  # what `lama train` asks
    meta = json.loads((tmp_path / "c" / META).read_text())
    assert meta["dtype"] == "bfloat16" and "float16 overflowed" in meta["dtype_note"]
    assert meta["version"] == CACHE_VERSION
    assert (tmp_path / "c" / "exit_0.npy").stat().st_size < win.ids.size * bb.shape.hidden_size * 4 // 2 + 1024
    for k, layer in enumerate([1, 3]):
        got = feats.hidden(k, np.arange(feats.total_tokens)).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref[layer], rtol=2 ** -8, atol=0)  # bfloat16's rounding, no more
        np.testing.assert_array_equal(feats.exits[k].astype(np.float32), got)  # numpy reads it as bfloat16 too
    # reused as it is (a float16 request accepts the bfloat16 it fell back to), and readable without the windows
    stamp = (tmp_path / "c" / "exit_0.npy").stat().st_mtime_ns
    again = cache_features(bb, win, [1, 3], folder=tmp_path / "c", dtype="float16")
    assert (tmp_path / "c" / "exit_0.npy").stat().st_mtime_ns == stamp
    loaded = load_features(tmp_path / "c")
    for f in (again, loaded):
        torch.testing.assert_close(f.hidden(1, np.arange(64)), feats.hidden(1, np.arange(64)), rtol=0, atol=0)
        torch.testing.assert_close(f.final_hidden(np.arange(64)), feats.final_hidden(np.arange(64)), rtol=0, atol=0)
    # float32 (and the RAM cache's default) hold them exactly
    exact = cache_features(bb, win, [1, 3], folder=tmp_path / "f", dtype="float32")
    assert json.loads((tmp_path / "f" / META).read_text())["dtype"] == "float32"
    np.testing.assert_allclose(np.asarray(exact.exits[0]), ref[1], rtol=1e-6, atol=0)


def test_float16_is_kept_where_the_states_fit(tmp_path):
    bb = tiny_backbone("gemma3_text")
    win = windows(bb)
    feats = cache_features(bb, win, [1, 3], folder=tmp_path / "c")
    assert json.loads((tmp_path / "c" / META).read_text())["dtype"] == "float16"
    assert feats.exits[0].dtype == np.float16
    np.testing.assert_allclose(feats.hidden(0, np.arange(feats.total_tokens)).numpy(), own_states(bb, win, [1])[1],
                               rtol=2 ** -11, atol=1e-6)
    ram = cache_features(big_gemma(), win, [1], dtype="float16")  # in RAM the same choice is made
    assert str(ram.exits[0].dtype) == "bfloat16" and np.isfinite(ram.exits[0].astype(np.float32)).all()


def test_an_old_cache_is_rebuilt_with_a_message(tmp_path, capsys):
    bb = tiny_backbone("llama")
    win = windows(bb)
    cache_features(bb, win, [1], folder=tmp_path / "c", dtype="float32")
    meta = tmp_path / "c" / META
    old = {**json.loads(meta.read_text()), "version": 1, "dtype": "float32"}
    old.pop("dtype_note", None)
    meta.write_text(json.dumps(old))
    assert load_features(tmp_path / "c").exits[0].dtype == np.float32  # an old cache still loads as before
    cache_features(bb, win, [1], folder=tmp_path / "c", dtype="float32")
    assert "rebuilding it as version" in capsys.readouterr().err
    assert json.loads(meta.read_text())["version"] == CACHE_VERSION


def test_a_model_with_non_finite_states_stops_caching(tmp_path):
    bb = tiny_backbone("llama")
    with torch.no_grad():
        bb.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="hidden state after layer 2 is non-finite"):
        cache_features(bb, windows(bb), [1, 2, 3], folder=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing half-written is left to be reused


def test_heads_on_big_gemma_states_train_with_finite_falling_losses(tmp_path):
    """The issue's case at tiny scale: `lama train` on a Gemma 3 whose states overflow float16."""
    from exporter.checkpoint import read_config

    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    recipe = Recipe(name="big-gemma", source=ModelSource("tiny"), exits=[1, 2, 3], train=CFG)
    ckpt = api.train(recipe, out=tmp_path / "ck", data=[text], backbone=big_gemma(), target=0.9)
    rep = read_config(ckpt).train["report"]
    assert np.isfinite([rep["loss_first"], rep["loss_last"]]).all()
    assert rep["loss_last"] < rep["loss_first"]


def test_a_non_finite_training_loss_stops_before_any_checkpoint(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    recipe = Recipe(name="tiny", source=ModelSource("tiny"), exits=[1, 2], train=CFG)
    # an infinite learning rate: the first step makes the weights infinite, the second loss is NaN
    with pytest.raises(NonFiniteError, match=r"exit after layer 1: training loss nan at step 2 of 40; its "
                                             r"head's weights are no longer finite.*Stopped before"):
        api.train(recipe, out=tmp_path / "ck", data=[text], backbone=tiny_backbone("llama"), lr=float("inf"))
    assert not (tmp_path / "ck").exists()


def test_non_finite_cached_states_are_named_as_the_cause():
    bb = tiny_backbone("llama")
    feats = cache_features(bb, windows(bb), [1, 2])
    feats.exits[1][:64] = np.nan  # a cache written some other way (two windows)
    heads = ExitHeads("adapter", [1, 2], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    with pytest.raises(NonFiniteError, match=r"exit after layer 2: training loss nan at step 1 of 5; its cached "
                                             r"hidden states are not finite"):
        train_heads(bb, heads, feats, TrainConfig(steps=5, batch_tokens=2048, seed=0))
    with pytest.raises(NonFiniteError, match=r"exit after layer 2: confidence nan for token 0 \(window 0\); 64 of"):
        exit_scores(bb, heads, feats)


def test_a_non_finite_gate_loss_stops_gate_fitting():
    bb = tiny_backbone("llama")
    feats = cache_features(bb, windows(bb), [1, 2])
    heads = ExitHeads("adapter", [1, 2], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    agree = exit_scores(bb, heads, feats).agree
    gates = ExitGates(2, bb.shape.hidden_size, 8)
    with pytest.raises(NonFiniteError, match=r"exit gate after layer 1: training loss nan at step 2 of 5"):
        train_gates(gates, bb, heads, feats, agree, steps=5, lr=float("inf"))


def test_non_finite_scores_and_thresholds_are_refused():
    conf = np.full((6, 2), 0.5)
    conf[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"exit after layer 4: confidence nan for token 3 \(window 1\); 1 of 6"):
        ExitScores(conf, np.ones((6, 2), bool), np.arange(6) // 2, [2, 4], 6)
    ok = ExitScores(np.full((6, 2), 0.5), np.ones((6, 2), bool), np.arange(6) // 2, [2, 4], 6)
    assert calibrate_thresholds(ok, 0.9) == [0.5, float("inf")]  # +inf is "never": allowed
    with pytest.raises(NonFiniteError, match="exit after layer 4: calibrated threshold nan"):
        check_thresholds([0.5, float("nan")], [2, 4])
    with pytest.raises(NonFiniteError, match="exit after layer 2: calibrated threshold -inf"):
        check_thresholds([float("-inf"), 0.5], [2, 4])


def test_lama_train_prints_the_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The CLI path: one line naming the exit and the step, exit status 2, no --out folder."""
    from lama.cli import main

    model_dir = tmp_path / "model"
    bb = tiny_backbone("llama")
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    forced = Recipe(name="tiny", source=ModelSource(str(model_dir)), exits=[1, 2],
                    train=TrainConfig(**{**CFG.__dict__, "lr": float("inf")}))  # forces a NaN at step 2
    monkeypatch.setattr(api, "resolve_recipe", lambda model: forced)
    rc = main(["train", str(model_dir), "--out", str(tmp_path / "ck"), "--data", str(text), "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lama train: error: exit after layer 1: training loss nan at step 2 of 5" in err
    assert "Traceback" not in err and not (tmp_path / "ck").exists()
