"""Exact mode with sampling on the real stories260K (../shared/hf-cache): drafts and exits' tokens
are kept while the full model's draw at their position equals them (speculative sampling for a
point-mass draft), so the output distribution must be plain sampling's (the full model,
thresholds "never", same SamplingParams).

The statistical test compares, position by position, the tokens of many exact-mode generations
(prompt-lookup drafts on a repetitive prompt, exits on in one configuration) with plain
sampling's under other seeds: a chi-square test per position, Bonferroni over every position of
every configuration, so that a correct runtime fails it with probability < 1e-3. The same test
runs two wrong rules (drafts always accepted; a mismatched draft accepted half the time) and
requires the check to catch both, so it has power. Exits use random (untrained) adapter heads:
their tokens are mostly rejected, which is what exercises that path."""

import json

import numpy as np
import pytest
from conftest import checkpoint_scores, requires_stories

from exporter import api
from runtime import Runtime
from runtime import generation

pytestmark = requires_stories

PROMPT = 'Lily said, "I like the ball." Tom said, "I like the ball." Lily said, "I like the'
N = 300  # generations per arm
TOKENS = 4  # tokens per generation
ALPHA = 1e-3  # false-alarm rate of the whole file's statistical check, for a correct runtime
CONFIGS = {
    "temperature": dict(thresholds="never", temperature=0.9),
    "filters+exits": dict(thresholds=[0.3, 0.0], temperature=1.0, top_k=40, top_p=0.95, min_p=0.02,
                          repetition_penalty=1.1),
}


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """stories260K with two random adapter exits (after layers 2 and 4 of 5), exported as is."""
    import torch

    from exporter.backbone import load_backbone
    from exporter.checkpoint import CheckpointConfig, save_checkpoint
    from exporter.heads import ExitHeads
    from exporter.recipes import ModelSource
    from runtime.manifest import to_json_thresholds

    d = tmp_path_factory.mktemp("spec_sampling")
    bb = load_backbone("karpathy/stories260K")
    torch.manual_seed(0)
    exits = [2, 4]
    heads = ExitHeads("adapter", exits, bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    cfg = CheckpointConfig(source=ModelSource("karpathy/stories260K"), exits=exits, num_layers=bb.shape.num_layers,
                           train={}, head="adapter", rank=4, thresholds=to_json_thresholds([float("inf")] * 2),
                           policy={"kind": "target", "target": 0.95, "delta": None}, confidence="top1")
    ckpt = save_checkpoint(d / "ckpt", cfg, heads, checkpoint_scores(bb, heads))
    return api.export(ckpt, out=d / "onnx", backbone=bb)


def _arm(rt, ids, seeds, exact: bool, thresholds="never", **params):
    """Tokens (len(seeds), TOKENS); drafted, accepted and exits' tokens rejected (rollbacks), summed."""
    out, drafted, accepted, rollbacks = [], 0, 0, 0
    for seed in seeds:
        r = rt.generate(ids, TOKENS, seed=int(seed), stop_at_eos=False, exact=exact,
                        thresholds=thresholds if exact else "never", **params)
        out.append(r.tokens)
        rollbacks += r.work()["rollbacks"]
        for v in r.drafts()["sources"].values():
            drafted, accepted = drafted + v["drafted"], accepted + v["accepted"]
    return np.array(out), drafted, accepted, rollbacks


def _p_values(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per position: chi-square test of equal token distributions in samples a and b (tokens
    seen fewer than 10 times in both together are pooled, so every expected count is >= 5)."""
    from scipy.stats import chi2_contingency

    out = []
    for i in range(a.shape[1]):
        cats, inv = np.unique(np.concatenate([a[:, i], b[:, i]]), return_inverse=True)
        table = np.stack([np.bincount(inv[:len(a)], minlength=len(cats)),
                          np.bincount(inv[len(a):], minlength=len(cats))])
        big = table.sum(0) >= 10
        table = np.concatenate([table[:, big], table[:, ~big].sum(1, keepdims=True)], axis=1)
        table = table[:, table.sum(0) > 0]
        out.append(float(chi2_contingency(table, correction=False)[1]) if table.shape[1] > 1 else 1.0)
    return out


def _coin_accept(rng):
    """A wrong rule: a draft the draw disagrees with is still kept half the time."""
    return lambda drawn, made: drawn == made or rng.random() < 0.5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_exact_sampling_has_plain_sampling_distribution(stories, config, monkeypatch):
    rt = Runtime.load(stories)
    ids = rt.encode(PROMPT)
    params = dict(CONFIGS[config])
    thresholds = params.pop("thresholds")
    level = ALPHA / (len(CONFIGS) * TOKENS)  # Bonferroni: every position of every configuration
    plain, *_ = _arm(rt, ids, range(N, 2 * N), exact=False, **params)
    exact, drafted, accepted, rollbacks = _arm(rt, ids, range(N), exact=True, thresholds=thresholds, **params)
    # the drafts were real: proposed on most runs, accepted often, rejected sometimes
    assert drafted >= N and 0.3 * drafted <= accepted < drafted, (drafted, accepted)
    if thresholds != "never":  # exits' tokens were drafts too (random heads: mostly rejected)
        assert rollbacks > N, rollbacks
    p = _p_values(exact, plain)
    assert min(p) > level, f"exact-mode sampling differs from plain sampling: p-values per position {p}"
    # negative controls: the same check catches wrong acceptance rules
    monkeypatch.setattr(generation, "accept", lambda drawn, made: True)
    always, *_ = _arm(rt, ids, range(2 * N, 3 * N), exact=True, thresholds=thresholds, **params)
    monkeypatch.setattr(generation, "accept", _coin_accept(np.random.default_rng(0)))
    coin, *_ = _arm(rt, ids, range(3 * N, 4 * N), exact=True, thresholds=thresholds, **params)
    for name, wrong in (("always accept", always), ("accept half the rejections", coin)):
        p_wrong = _p_values(wrong, plain)
        assert min(p_wrong) < level, f"the check misses a wrong rule ({name}): p-values {p_wrong}"


@pytest.mark.parametrize("config", [*CONFIGS, "penalty-only"])
def test_a_seed_gives_plain_sampling_tokens(stories, config):
    """Each emitted token is one draw from the generation's random stream, in order, as in plain
    sampling: for a seed, exact mode emits plain sampling's tokens, and the same tokens again.
    (A repetition penalty at temperature 0 is deterministic, and goes the same way.)"""
    rt = Runtime.load(stories)
    params = dict(CONFIGS.get(config, dict(thresholds=[0.3, 0.0], temperature=0.0, repetition_penalty=1.3)))
    thresholds = params.pop("thresholds")
    accepted = 0
    for seed in range(8):
        plain = rt.generate(PROMPT, 24, thresholds="never", seed=seed, stop_at_eos=False, **params)
        exact = rt.generate(PROMPT, 24, thresholds=thresholds, seed=seed, stop_at_eos=False, exact=True, **params)
        assert exact.tokens == plain.tokens, seed
        streamed = list(rt.stream(PROMPT, 24, thresholds=thresholds, seed=seed, stop_at_eos=False, exact=True,
                                  **params))
        assert tuple(r.token for r in streamed) == plain.tokens
        assert "".join(r.text for r in streamed) == plain.text
        d = exact.drafts()
        accepted += d["sources"]["lookup"]["accepted"]
        # what the summary reports is what the records say
        assert d["sources"]["lookup"]["accepted"] == sum(r.source == "lookup" for r in exact.records)
        assert d["steps"] == sum(r.steps for r in exact.records)
        if thresholds == "never":  # no rollbacks: every step made one token or more
            assert d["steps"] <= len(exact.tokens) - d["sources"]["lookup"]["accepted"] + 1
    assert accepted > 0


def test_cli_exact_with_temperature(stories, capsys):
    from runtime.cli import main

    args = [str(stories), PROMPT, "--max-new-tokens", "12", "--exact", "--temperature", "0.8", "--seed", "3",
            "--ignore-eos", "--threads", "1", "--json"]
    assert main(["generate", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = Runtime.load(stories).generate(PROMPT, 12, thresholds="never", temperature=0.8, seed=3, stop_at_eos=False)
    assert got["tokens"] == list(ref.tokens)
    assert got["drafts"]["sources"]["lookup"]["drafted"] > 0
    assert main(["generate", *args[:-1]]) == 0  # streamed text, the statistics line with tokens per step
    err = capsys.readouterr().err
    assert "tokens per step" in err and "drafts accepted: lookup" in err
