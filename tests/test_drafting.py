"""Exact multi-token decoding: drafts fed after the current token, verified by the whole chain
in one call, the longest agreeing prefix kept and the KV cache rolled back over the rest. The
output must be the full model's greedy output whatever the drafts are, in both KV layouts,
with early exits on or off, and up to the end of the context window."""

import numpy as np
import pytest
from conftest import make_checkpoint

from exporter import api
from runtime import Runtime
from runtime.drafting import DraftLengths, PromptLookup, make_drafters

CAPACITY = 64
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One tiny Llama checkpoint (exits after layers 1, 2, 3) in both KV layouts."""
    d = tmp_path_factory.mktemp("drafting")
    ckpt, bb = make_checkpoint(d, "llama_hd16")
    return {"concat": api.export(ckpt, out=d / "concat", kv="concat", backbone=bb),
            "buffer": api.export(ckpt, out=d / "buffer", kv="buffer", kv_capacity=CAPACITY, backbone=bb),
            "plain": api.export(ckpt, out=d / "plain", kv="buffer", kv_capacity=CAPACITY, backbone=bb, exits=False)}


class Scripted:
    """Drafts from a known continuation: right for the first `right` tokens of each proposal,
    then wrong (a different token id), so acceptance is exactly controlled."""

    def __init__(self, sequence, right, vocab, name="scripted"):
        self.sequence, self.right, self.vocab, self.name = list(sequence), right, vocab, name
        self.proposed = 0

    def propose(self, history, k):
        pos = len(history)
        truth = self.sequence[pos:pos + k]
        right = self.right(k) if callable(self.right) else self.right
        out = [t if i < right else (t + 1) % self.vocab for i, t in enumerate(truth)]
        self.proposed += len(out)
        return out


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = PromptLookup(max_ngram=3, min_ngram=2)
    assert d.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]  # 3-gram 5 6 7 seen at 0
    assert d.propose([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # latest match of "1 2" wins
    assert d.propose([1, 2, 3, 4], 5) == []  # nothing repeats
    assert d.propose([1, 2, 9, 9, 1, 2], 10) == [9, 9, 1, 2]  # never past the end of the history
    assert d.propose([3, 3], 2) == []  # below min_ngram
    assert PromptLookup(min_ngram=1).propose([4, 7, 4], 2) == [7, 4]
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_draft_length_follows_what_drafting_earns():
    lengths = DraftLengths(cost=0.05)
    assert 1 <= lengths.choose("lookup", 6) <= 6  # the prior (half accepted) pays for a few positions
    for _ in range(30):
        lengths.update("lookup", 6, 6)  # every draft accepted: draft as long as allowed
    assert lengths.choose("lookup", 6) == 6
    bad = DraftLengths(cost=0.05)
    for _ in range(30):
        bad.update("lookup", 3, 0)  # the first position always rejected: stop paying for drafts
    assert bad.choose("lookup", 6) == 0
    assert DraftLengths(cost=5.0).choose("x", 6) == 0  # a position dearer than a call never pays
    assert DraftLengths(cost=0.0).choose("x", 6) == 6  # free positions (a GPU): draft all
    padded = DraftLengths(cost=0.05, free=1)  # exact decoding on a KV buffer pays for one position anyway
    for _ in range(30):
        padded.update("lookup", 3, 0)
    assert padded.choose("lookup", 6) == 1


def test_make_drafters_names_and_errors():
    assert [d.name for d in make_drafters(None)] == ["lookup"]
    assert make_drafters("none") == [] and make_drafters([]) == []
    with pytest.raises(ValueError, match="unknown draft source"):
        make_drafters("medusa-typo")
    with pytest.raises(TypeError, match="propose"):
        make_drafters([object()])


@pytest.mark.parametrize("layout", ["concat", "buffer"])
@pytest.mark.parametrize("right", ["all", "none", "mixed"])
@pytest.mark.parametrize("exits", ["never", "all-early"])
def test_drafts_verified_exactly(exports, layout, right, exits):
    rt = Runtime.load(exports[layout])
    vocab = rt.manifest.model.vocab_size
    full = rt.generate(PROMPT, 20, thresholds="never", stop_at_eos=False)
    sequence = list(full.prompt_tokens) + list(full.tokens)
    rng = np.random.default_rng(0)
    rule = {"all": 99, "none": 0, "mixed": lambda k: int(rng.integers(0, k + 1))}[right]
    drafter = Scripted(sequence, rule, vocab)
    thresholds = "never" if exits == "never" else [0.0] * len(rt.manifest.exits)
    res = rt.generate(PROMPT, 20, thresholds=thresholds, stop_at_eos=False, exact=True, drafts=[drafter])
    assert res.tokens == full.tokens
    d = res.drafts()
    assert drafter.proposed > 0 and d["sources"]["scripted"]["drafted"] == drafter.proposed
    accepted = d["sources"]["scripted"]["accepted"]
    if right == "all" and exits == "never":
        # every draft right: each step makes its drafts plus the full model's next token
        assert accepted == d["sources"]["scripted"]["drafted"] and d["tokens_per_step"] > 2
    if right == "none":
        assert accepted == 0
    # the cache it hands back is the full model's for exactly those tokens
    assert_kept_cache_is_full_models(rt, list(full.prompt_tokens) + list(full.tokens))


def assert_kept_cache_is_full_models(rt, sequence: list[int]) -> None:
    """The cache the last generation kept (flushed) equals the full model's for `sequence`
    minus its last token (which no step has fed yet)."""
    kept = rt.kept.cache
    ref = rt.new_cache()
    rt.step(np.array(sequence[:-1]), ref, [float("inf")] * len(rt.manifest.exits))
    rt.flush(kept)
    assert kept.position == ref.position
    for a, b in zip(kept.segments, ref.segments):
        assert a.length == b.length
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            x, y = np.asarray(x)[:, :, :a.length], np.asarray(y)[:, :, :b.length]
            # bit for bit where the export says a position computes alike in any call
            assert np.abs(x - y).max() <= (0.0 if rt.manifest.row_invariant else 1e-4)


@pytest.mark.parametrize("layout", ["concat", "buffer", "plain"])
@pytest.mark.parametrize("right", ["all", "none", "mixed"])
@pytest.mark.parametrize("exits", ["never", "all-early"])
@pytest.mark.parametrize("rows", ["per-position outputs", "older export"])
def test_sampled_drafts_keep_plain_sampling(exports, layout, right, exits, rows, monkeypatch):
    """Exact mode with sampling draws each token from the full model's distribution at its
    position, in order, with the generation's one random stream: every emitted token is one
    draw, as in plain sampling. So for a seed its output is plain sampling's (exits off), token
    for token, whatever the drafts and exits are; a draft equal to plain sampling's token is
    accepted. Checked in both KV layouts and on a single-graph export (no exits); with the last
    segment's per-position top-k (one call checks every drafted position) and as an export made
    before them runs (one call per checked position)."""
    from runtime.chain import Chain

    if rows == "older export":
        monkeypatch.setattr(Chain, "_rows_all", lambda self, seg: None)
    rt = Runtime.load(exports[layout])
    if layout == "plain" and exits != "never":
        pytest.skip("no exits in a single-graph export")
    opts = dict(temperature=0.9, top_k=20, repetition_penalty=1.1, stop_at_eos=False)
    for seed in (0, 1):
        plain = rt.generate(PROMPT, 20, thresholds="never", seed=seed, **opts)
        sequence = list(plain.prompt_tokens) + list(plain.tokens)
        rng = np.random.default_rng(seed)
        rule = {"all": 99, "none": 0, "mixed": lambda k: int(rng.integers(0, k + 1))}[right]
        drafter = Scripted(sequence, rule, rt.manifest.model.vocab_size)
        thresholds = "never" if exits == "never" else [0.0] * len(rt.manifest.exits)
        res = rt.generate(PROMPT, 20, thresholds=thresholds, seed=seed, exact=True, drafts=[drafter], **opts)
        assert res.tokens == plain.tokens
        d = res.drafts()["sources"]["scripted"]
        assert drafter.proposed > 0 and d["drafted"] == drafter.proposed
        if right == "all" and exits == "never":
            assert d["accepted"] == d["drafted"] and res.drafts()["tokens_per_step"] > 2
            steps, calls = res.drafts()["steps"], sum(r.calls for r in res.records)
            segments = len(rt.manifest.segments)
            if rows == "per-position outputs":  # one call per segment per step, a final flush at most
                assert calls <= (steps + 1) * segments
            else:  # the last segment once per drafted position
                assert calls > (steps + 1) * segments
        if right == "none":
            assert d["accepted"] == 0
        if exits != "never" and right == "none":  # drafting stops paying; random heads exiting everywhere are rejected
            assert res.work()["rollbacks"] > 0
        # the kept cache is the full model's for exactly those tokens
        assert_kept_cache_is_full_models(rt, sequence)


@pytest.mark.parametrize("layout", ["concat", "buffer"])
def test_prompt_lookup_is_exact_and_reports_per_source(exports, layout):
    rt = Runtime.load(exports[layout])
    prompt = "abc abc abc abc abc abc abc"  # a loop the lookup can copy
    full = rt.generate(prompt, 16, thresholds="never", stop_at_eos=False)
    res = rt.generate(prompt, 16, stop_at_eos=False, exact=True)  # every source the export holds
    assert res.tokens == full.tokens
    lookup = res.drafts()["sources"]["lookup"]
    assert lookup["drafted"] > 0 and 0 <= lookup["accepted"] <= lookup["drafted"]
    assert "tokens per step" in res.summary() and res.to_dict()["drafts"]["sources"]["lookup"]["drafted"] > 0
    # the steps counted are the calls that made tokens: fewer than tokens once a draft is accepted
    assert res.drafts()["steps"] == len(res.tokens) - lookup["accepted"]
    off = rt.generate(prompt, 16, stop_at_eos=False, exact=True, drafts="none")
    assert off.tokens == full.tokens and off.drafts()["sources"] == {}


def test_drafts_up_to_the_end_of_the_kv_buffer(exports):
    """Drafts never run past the buffer: generation ends at its capacity with the full model's tokens."""
    rt = Runtime.load(exports["buffer"])
    full = rt.generate(PROMPT, 100, thresholds="never", stop_at_eos=False)
    assert full.stop_reason == "context"
    sequence = list(full.prompt_tokens) + list(full.tokens)
    res = rt.generate(PROMPT, 100, thresholds="never", stop_at_eos=False, exact=True,
                      drafts=[Scripted(sequence, 99, rt.manifest.model.vocab_size)])
    assert res.tokens == full.tokens and res.stop_reason == "context"
    assert len(full.prompt_tokens) + len(res.tokens) == CAPACITY


def test_draft_options_are_checked(exports):
    rt = Runtime.load(exports["concat"])
    with pytest.raises(ValueError, match="exact"):
        rt.generate(PROMPT, 4, drafts="lookup")
    with pytest.raises(ValueError, match="draft_tokens"):
        rt.generate(PROMPT, 4, exact=True, draft_tokens=-1)
    with pytest.raises(ValueError, match="draft_cost"):
        rt.generate(PROMPT, 4, exact=True, draft_cost=float("nan"))
    res = rt.generate(PROMPT, 8, exact=True, draft_tokens=0, stop_at_eos=False)
    assert res.drafts()["sources"] == {}


# -- the online check of relaxed mode ------------------------------------------------------------
def test_online_check_tightens_exits_that_disagree(exports):
    """Random heads forced to exit everywhere agree with the full model rarely: the check sees
    it as their deferred layers run, and switches those exits off; what it reports is what ran."""
    from runtime.online import OnlineCheck

    rt = Runtime.load(exports["concat"], max_pending=2)
    loose = [0.0] * len(rt.manifest.exits)
    plain = rt.generate(PROMPT, 40, thresholds=loose, stop_at_eos=False)
    checked = rt.generate(PROMPT, 40, thresholds=loose, stop_at_eos=False, online_check=True)
    rep = checked.online
    assert rep["changes"], rep  # at least one exit was tightened
    n = sum(e["checked"] for e in rep["exits"])
    assert n > 0 and all(e["agreed"] <= e["checked"] for e in rep["exits"])
    assert checked.mean_layers > plain.mean_layers  # tightened exits let tokens out later
    assert "online check" in checked.summary() and checked.to_dict()["online_check"] == rep
    # a check that never fires changes nothing: same tokens as without it
    calm = OnlineCheck.for_manifest(rt.manifest, rt.resolve_thresholds(loose), target=0.01)
    same = rt.generate(PROMPT, 40, thresholds=loose, stop_at_eos=False, online_check=calm)
    assert same.tokens == plain.tokens and same.online["changes"] == []


def test_online_check_refusals(exports):
    rt = Runtime.load(exports["concat"])
    with pytest.raises(ValueError, match="relaxed mode"):
        rt.generate(PROMPT, 4, exact=True, online_check=True)
    with pytest.raises(ValueError, match="defer"):
        Runtime.load(exports["concat"], kv_policy="fill").generate(PROMPT, 4, online_check=True)
    with pytest.raises(TypeError, match="online_check"):
        rt.generate(PROMPT, 4, online_check="yes")


def test_a_kv_buffer_is_recycled_between_generations(exports):
    """A new sequence reuses the previous one's KV buffers (emptied): same tokens as a fresh
    runtime, whatever the old bytes above the valid length were."""
    rt = Runtime.load(exports["buffer"])
    first = rt.generate("abc abc abc", 12, stop_at_eos=False)
    buffers = rt.kept.cache
    second = rt.generate(PROMPT, 12, stop_at_eos=False)  # no common prefix: a new sequence
    assert rt.kept.cache is buffers
    assert second.tokens == Runtime.load(exports["buffer"]).generate(PROMPT, 12, stop_at_eos=False).tokens
    again = rt.generate(PROMPT, 12, stop_at_eos=False, exact=True)  # drafts + rollback on a recycled buffer
    assert again.tokens == second.tokens and first.tokens
