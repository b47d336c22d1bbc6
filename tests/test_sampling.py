"""Sampling on the heads' top-k logits, and every way a generation stops."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from runtime import Runtime
from runtime.sampling import Sampler, SamplingParams, dense_logits
from runtime.stopping import StopStrings

PROMPT = "It is a truth universally acknowledged"


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# -- the sampler on its own ---------------------------------------------------------------------

def test_draws_follow_the_tempered_distribution():
    z = np.array([2.0, 1.0, 0.5, -1.0, -np.inf])
    s = Sampler(SamplingParams(temperature=0.7, seed=1))
    draws = np.bincount([s.pick(z) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(draws[:4], softmax(z[:4] / 0.7), atol=0.015)
    assert draws[4] == 0  # -inf (outside the graph's top-k) is never drawn


def test_filters_keep_the_right_tokens():
    z = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    ids = lambda **kw: sorted(Sampler(SamplingParams(temperature=1.0, **kw)).probabilities(z)[0].tolist())  # noqa
    assert ids(top_k=2) == [1, 3]
    assert ids(top_p=0.7) == [1, 3]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert ids(top_p=0.5) == [1]
    assert ids(min_p=0.35) == [1, 3]  # >= 0.175
    assert ids() == [0, 1, 2, 3]
    _, p = Sampler(SamplingParams(temperature=1.0, top_k=2)).probabilities(z)
    np.testing.assert_allclose(sorted(p), [0.3 / 0.8, 0.5 / 0.8])


def test_repetition_penalty_and_greedy():
    z = np.array([2.0, 1.9, -0.5, -0.6])
    assert Sampler(SamplingParams()).pick(z, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.2)).pick(z, [0]) == 1  # 2.0 / 1.2 < 1.9
    # a positive logit is divided, a negative one multiplied: both make the seen token less likely
    assert Sampler(SamplingParams()).pick(np.array([0.6, 0.5]), [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5)).pick(np.array([0.6, 0.5]), [0]) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.5)).pick(np.array([-0.5, -0.6]), [0]) == 1
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(repetition_penalty=1.1).greedy


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(repetition_penalty=0), dict(temperature=float("nan")), dict(top_p=float("nan")),
                                 dict(seed=-1)])
def test_bad_sampling_params(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad", [dict(top_k=1.5), dict(temperature="0.7"), dict(seed=1.5), dict(seed="1"),
                                 dict(top_k=True), dict(repetition_penalty=None)])
def test_sampling_params_of_the_wrong_type(bad):
    (name,) = bad
    with pytest.raises(TypeError, match=f"^{name} must be"):
        SamplingParams(**bad)


def test_dense_logits():
    d = dense_logits(np.array([[3.0, 1.0]]), np.array([[4, 0]]), 6)
    assert d[0, 4] == 3 and d[0, 0] == 1 and np.isneginf(d[0, [1, 2, 3, 5]]).all()


# -- sampling on an export without full logits --------------------------------------------------

def test_topk_logits_are_the_heads_largest(chat_export):
    folder, bb = chat_export
    rt = Runtime.load(folder)
    last = rt.manifest.segments[-1]
    assert last.output("logits") is None and last.output("topk_values").shape[1] == 64  # vocab 97
    ids = rt.encode(PROMPT)
    with torch.no_grad():
        ref = bb.model(torch.tensor([ids.tolist()])).logits[0, -1].numpy()
    _, _, _, logits = rt.step(ids, rt.new_cache(), rt.resolve_thresholds("never"), want_logits=True)
    top = np.argsort(-ref)[:64]
    assert set(np.flatnonzero(np.isfinite(logits[0]))) == set(top.tolist())
    np.testing.assert_allclose(logits[0, top], ref[top], atol=1e-4)


@pytest.mark.parametrize("thresholds", ["never", [0.2, 0.2, 0.2]])
def test_top_k_1_sampling_equals_greedy(chat_export, thresholds):
    rt = Runtime.load(chat_export[0])
    greedy = rt.generate(PROMPT, 24, thresholds=thresholds)
    for seed in (0, 7):
        sampled = rt.generate(PROMPT, 24, thresholds=thresholds, temperature=1.5, top_k=1, seed=seed)
        assert sampled.tokens == greedy.tokens


def test_sampling_is_seeded_and_varies(chat_export):
    rt = Runtime.load(chat_export[0])
    opts = dict(temperature=1.0, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    a, b = rt.generate(PROMPT, 24, seed=1, **opts), rt.generate(PROMPT, 24, seed=1, **opts)
    c = rt.generate(PROMPT, 24, seed=2, **opts)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.tokens != rt.generate(PROMPT, 24).tokens
    with pytest.raises(TypeError, match="unknown generation options"):
        rt.generate(PROMPT, 4, temprature=1.0)
    with pytest.raises(TypeError, match="use Runtime.stream"):
        rt.generate(PROMPT, 4, stream=True)


# -- stopping -----------------------------------------------------------------------------------

def test_stop_strings_stop_and_are_cut(chat_export):
    rt = Runtime.load(chat_export[0])
    full = rt.generate(PROMPT, 24)
    stop = full.text[5:7]
    cut = full.text.find(stop)
    stream = rt.stream(PROMPT, 24, stop=[stop, "never appears \x00"])
    pieces = [r.text for r in stream]
    result = stream.result()
    assert result.stop_reason == "stop" and result.text == full.text[:cut]
    assert "".join(pieces) == result.text  # the stream never showed any part of the stop string
    assert len(result.tokens) < len(full.tokens) and result.tokens == full.tokens[:len(result.tokens)]
    assert stream.records[-1].stop == "stop"


def test_stop_string_holdback():
    s = StopStrings(("abc", "xy"))
    assert s.holdback("zzab") == 2 and s.holdback("zzx") == 1 and s.holdback("zzq") == 0
    assert s.find("..abc.xy") == 2 and s.find("..xy") == 2 and s.find("....", 2) is None
    with pytest.raises(ValueError):
        StopStrings(("",))


def test_every_eos_id_stops(chat_export, tmp_path):
    dst = tmp_path / "eos"
    shutil.copytree(chat_export[0], dst)
    tokens = Runtime.load(dst).generate(PROMPT, 24).tokens
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"]["eos_ids"] = [96, tokens[5]]  # a second EOS id, as generation_config lists them
    (dst / "manifest.json").write_text(json.dumps(m))
    rt = Runtime.load(dst)
    r = rt.generate(PROMPT, 24)
    assert r.stop_reason == "eos" and r.tokens == tokens[:tokens.index(tokens[5]) + 1]
    assert rt.generate(PROMPT, 24, stop_at_eos=False).tokens == tokens


def test_export_records_every_eos_id():
    from types import SimpleNamespace as NS

    from exporter.onnx_export import _eos_ids

    assert _eos_ids(NS(eos_token_id=2), NS(generation_config=NS(eos_token_id=[2, 7]))) == (2, 7)
    assert _eos_ids(NS(eos_token_id=None), NS(generation_config=NS(eos_token_id=5))) == (5,)
    assert _eos_ids(NS(eos_token_id=None), None) == ()


def test_limits_time_and_cancellation(chat_export):
    rt = Runtime.load(chat_export[0])
    assert rt.generate(PROMPT, 5).stop_reason == "max_new_tokens"
    long = rt.encode(PROMPT).tolist() * 6  # 228 of 256 positions
    r = rt.generate(long, 100)
    assert r.stop_reason == "context" and len(r.tokens) == 256 - len(long)
    r = rt.generate(PROMPT, 20, max_time=1e-9)
    assert r.stop_reason == "max_time" and len(r.tokens) == 1
    cancel = threading.Event()
    stream = rt.stream(PROMPT, 20, cancel=cancel)
    for i, rec in enumerate(stream):
        if i == 2:
            cancel.set()
    assert stream.result().stop_reason == "cancelled" and len(stream.result().tokens) == 4
    stream = rt.stream(PROMPT, 20)
    next(stream), next(stream)
    stream.close()  # closing the iterator ends the generation too
    closed = stream.result()
    assert len(closed.tokens) == 2 and closed.stop_reason is None
    with pytest.raises(ValueError, match="max_time"):
        rt.generate(PROMPT, 4, max_time=0)
