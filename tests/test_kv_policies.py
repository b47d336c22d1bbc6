"""Work that runs, all-or-nothing steps, bounded deferral, exact mode and the K/V fill policy."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_checkpoint, tiny_backbone

from exporter import api
from exporter.families import LayerCache
from runtime import Runtime
from runtime.kv_cache import KVCache
from runtime.chain import StepStats

PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Tiny Llama, 4 layers, exits after layers 1, 2, 3: four one-layer segments."""
    d = tmp_path_factory.mktemp("kv")
    ckpt, bb = make_checkpoint(d, "llama")
    return api.export(ckpt, out=d / "onnx", backbone=bb), bb


def forced(j: int, exits: int = 3) -> list[float]:
    """Thresholds that make a token leave at segment j (3 = the last segment, the full model)."""
    return [float("inf")] * j + [0.0] * (exits - j)


def run(rt, tokens, pattern, cache=None):
    """4-token prefill then one token per step, leaving at pattern[i]; (cache, per-step StepStats)."""
    cache = cache or rt.new_cache()
    steps = [tokens[:4]] + [[t] for t in tokens[4:]]
    out = []
    for ids, j in zip(steps, pattern):
        stats = StepStats()
        _, got, _, _ = rt.step(np.array(ids), cache, forced(j), stats=stats)
        assert got == j
        out.append(stats)
    return cache, out


def assert_same_cache(a: KVCache, b: KVCache, tol: float = 1e-4) -> None:
    assert a.position == b.position
    for sa, sb in zip(a.segments, b.segments):
        assert sa.length == sb.length and sa.pending_count == sb.pending_count
        n = sa.length  # buffers (KV layout "buffer") hold capacity positions; [0, length) is the cache
        for x, y in zip(sa.keys + sa.values, sb.keys + sb.values):
            x, y = np.asarray(x)[:, :, :n], np.asarray(y)[:, :, :n]
            assert x.shape == y.shape and np.abs(x - y).max(initial=0.0) <= tol
        if sa.pending is not None:
            assert np.abs(sa.pending - sb.pending).max() <= tol


# -- 1. the work counter ------------------------------------------------------------------------
def test_work_counter_equals_hand_counted_schedule(export):
    folder, _ = export
    tokens = list(range(10, 20))
    pattern = [3, 0, 0, 2, 3, 1]
    # defer, unbounded. Segments hold one layer each, so layer-positions = positions per call.
    #   prefill 4 positions, all 4 segments: 16, 4 calls
    #   exit 0: seg0 1                                   -> 1, 1 call  (seg1 waits for 1)
    #   exit 0: seg0 1                                   -> 1, 1 call  (seg1 waits for 2)
    #   exit 2: seg0 1, seg1 2+1, seg2 3                 -> 7, 3 calls (seg3 waits for 3)
    #   exit 3: seg0 1, seg1 1, seg2 1, seg3 3+1         -> 7, 4 calls
    #   exit 1: seg0 1, seg1 1                           -> 2, 2 calls (seg2 waits for 1)
    rt = Runtime.load(folder, max_pending=100)
    cache, stats = run(rt, tokens, pattern)
    assert [s.layer_positions for s in stats] == [16, 1, 1, 7, 7, 2]
    assert [s.calls for s in stats] == [4, 1, 1, 3, 4, 2]
    assert all(s.fill_positions == 0 for s in stats)
    assert rt.owed(cache) == 1 * 2  # one position waits before segment 2: layers 2 and 3

    # fill: an exit at segment j runs j+1 layers and fills the 3-j skipped ones (one fill call)
    rt = Runtime.load(folder, kv_policy="fill")
    cache, stats = run(rt, tokens, pattern)
    assert [s.layer_positions for s in stats] == [16, 1, 1, 3, 4, 2]
    assert [s.fill_positions for s in stats] == [0, 3, 3, 1, 0, 2]
    assert [s.calls for s in stats] == [4, 2, 2, 4, 4, 3]
    assert rt.owed(cache) == 0 and all(st.length == 9 for st in cache.segments)

    # bound 1: the second deferred position makes the step flush it deep
    #   exit 0: 1 (seg1 waits for 1); exit 0: 1 + flush seg1 2, seg2 2, seg3 2 -> 7, 4 calls
    rt = Runtime.load(folder, max_pending=1)
    _, stats = run(rt, tokens, [3, 0, 0])
    assert [s.layer_positions for s in stats] == [16, 1, 7]
    assert [s.calls for s in stats] == [4, 1, 4]


def test_generation_records_add_up(export):
    folder, _ = export
    rt = Runtime.load(folder)
    n = len(rt.encode(PROMPT))
    full = rt.generate(PROMPT, 12, thresholds="never", stop_at_eos=False)
    w = full.work()
    assert w["layer_positions"] == w["plain_layer_positions"] == (n + 11) * 4 and w["share"] == 1.0
    early = rt.generate(PROMPT, 12, thresholds=[0.0] * 3, stop_at_eos=False)
    w = early.work()
    # every position is run by segment 0 once; what the others ran or still owe adds up to the plain model
    assert w["layer_positions"] + w["owed"] == w["plain_layer_positions"]
    assert "layer-positions per token" in early.summary() and "p95" in early.summary()


# -- issue 14: a failed step changes nothing ----------------------------------------------------
class Failing:
    """A backend whose runs fail (both the plain and the bound-buffer path); the rest delegates."""

    def __init__(self, backend):
        self.backend, self.input_names = backend, backend.input_names

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, feeds):
        raise RuntimeError("device lost")

    def run_bound(self, binding, feeds):
        raise RuntimeError("device lost")


def test_failed_step_leaves_cache_as_before(export):
    folder, _ = export
    rt = Runtime.load(folder, max_pending=100)
    tokens = list(range(30, 40))
    cache, _ = run(rt, tokens[:7], [3, 0, 0, 0])  # segment 1 holds 3 deferred positions
    before = cache.mark()
    keys0 = [k.copy() for k in cache.segments[0].keys]
    pending = cache.segments[1].pending.copy()
    good = rt.backends[2]
    rt.backends[2] = Failing(good)
    with pytest.raises(RuntimeError, match="device lost"):
        rt.step(np.array([tokens[7]]), cache, forced(3))
    rt.backends[2] = good
    assert cache.position == before.position
    assert [st.length for st in cache.segments] == list(before.lengths)
    assert cache.segments[0].keys[0].shape == keys0[0].shape
    assert np.array_equal(cache.segments[1].pending, pending)
    # and the retried step gives what a run without the failure gives
    rt.step(np.array([tokens[7]]), cache, forced(3))
    ref, _ = run(rt, tokens[:8], [3, 0, 0, 0, 3])
    assert_same_cache(cache, ref)


# -- 3. bounded deferral ------------------------------------------------------------------------
class Recording:
    def __init__(self, backend, log):
        self.backend, self.input_names, self.log = backend, backend.input_names, log

    def run(self, feeds):
        self.log.append(next(iter(feeds.values())).shape[1])
        return self.backend.run(feeds)


@pytest.mark.parametrize("bound", [0, 2, 5])
def test_pending_never_exceeds_the_bound(export, bound):
    folder, _ = export
    rt = Runtime.load(folder, max_pending=bound)
    rng = np.random.default_rng(bound)
    tokens = rng.integers(0, 95, size=44).tolist()
    pattern = [3] + rng.choice([0, 0, 0, 1, 2, 3], size=40).tolist()
    log = []
    rt.backends = [Recording(b, log) for b in rt.backends]
    cache = rt.new_cache()
    for i, j in enumerate(pattern):
        ids = tokens[:4] if i == 0 else [tokens[3 + i]]
        start = len(log)
        rt.step(np.array(ids), cache, forced(j))
        assert sum(cache.pending_counts()) <= bound  # all segments together, so each one too
        if i:
            assert max(log[start:]) <= bound + 1  # a decode call never carries more than bound + 1 positions
    rt.flush(cache)  # and the caches are still the full model's
    full = Runtime.load(folder)
    ref, _ = run(full, tokens[:len(pattern) + 3], [3] * len(pattern))
    assert_same_cache(cache, ref)


def test_export_records_the_bound(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "gpt2", exits=(2,))
    folder = api.export(ckpt, out=tmp_path / "onnx", backbone=bb, max_pending=3)
    rt = Runtime.load(folder)
    assert rt.manifest.dims["decode_sequence"]["max"] == 4 and rt.max_pending == 3
    assert Runtime.load(folder, max_pending=6).max_pending == 6


# -- 2. exact mode ------------------------------------------------------------------------------
def test_truncate_equals_a_fresh_run_on_the_kept_tokens(export):
    folder, _ = export
    rt = Runtime.load(folder, max_pending=100)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 95, size=24).tolist()
    pattern = [3] + rng.choice([0, 1, 2, 3], size=20).tolist()
    ref, _ = run(rt, tokens, [3] * len(pattern))
    for keep in (5, 12, 20):
        cache, _ = run(rt, tokens, pattern)
        cache.truncate(keep)
        assert cache.position == keep
        assert all(st.pending_end <= keep for st in cache.segments)
        rt.flush(cache)  # what was pending before the cut still runs deep exactly; nothing beyond it is left
        cut = KVCache([type(st)([np.asarray(k)[:, :, :keep] for k in st.keys],
                                [np.asarray(v)[:, :, :keep] for v in st.values], keep)
                       for st in ref.segments], keep)
        assert_same_cache(cache, cut)


@pytest.mark.parametrize("thresholds", [[0.0] * 3, [0.05, 0.1, 0.2], [float("inf"), 0.0, 0.3]])
def test_exact_mode_equals_full_greedy(export, thresholds):
    folder, _ = export
    rt = Runtime.load(folder)
    full = rt.generate(PROMPT, 24, thresholds="never", stop_at_eos=False)
    res = rt.generate(PROMPT, 24, thresholds=thresholds, stop_at_eos=False, exact=True)
    assert res.tokens == full.tokens
    streamed = list(rt.stream(PROMPT, 24, thresholds=thresholds, stop_at_eos=False, exact=True))
    assert tuple(r.token for r in streamed) == full.tokens
    assert "".join(r.text for r in streamed) == full.text
    if thresholds == [0.0] * 3:
        assert res.work()["rollbacks"] > 0  # random heads disagree: this run exercised rollbacks


def test_exact_mode_refusals(export):
    folder, _ = export
    with pytest.raises(ValueError, match="defer"):
        Runtime.load(folder, kv_policy="fill").generate(PROMPT, 4, exact=True)


# -- 4. the fill policy -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES + ["qwen3", "mistral"])
def test_kv_projection_equals_the_layers_own_keys_and_values(family):
    bb = tiny_backbone(family, layers=3)
    fam = bb.family
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, bb.shape.hidden_size)
    pos = torch.arange(7, 12).unsqueeze(0).repeat(2, 1)
    masks = fam.attention_masks(torch.ones(2, 5, dtype=torch.long), 5, hidden.dtype)
    with torch.no_grad():
        for i in range(3):
            cache = LayerCache(i)
            fam.run_layer(i, hidden, masks, pos, fam.position_embeddings(hidden, pos), cache)
            k_ref, v_ref = cache.presents()[0]
            k, v = fam.kv_projection(i, hidden, pos)
            assert torch.allclose(k, k_ref, atol=1e-6) and torch.allclose(v, v_ref, atol=1e-6)


def test_fill_keys_and_values_are_the_exited_states_projections(export):
    folder, bb = export
    rt = Runtime.load(folder, kv_policy="fill")
    tokens = list(range(40, 52))
    pattern = [3, 3, 0, 1, 3, 0, 2, 3, 0]
    cache, stats = run(rt, tokens, pattern)
    # exited state of the token at position p: the model's hidden state after its exit layer
    # (the caches it went through are exact up to there only if nothing before was filled: so
    # compute it with the runtime's own caches, through PyTorch layers fed the same K/V)
    ids = torch.tensor([tokens])
    fam = bb.family
    with torch.no_grad():
        for step, j in enumerate(pattern):
            if step == 0 or j == 3:
                continue
            p = 3 + step
            # the segments up to j ran exactly on this position given their caches: rerun them in torch
            h = fam.embed(ids[:, p:p + 1], torch.tensor([[p]]))
            pos = torch.tensor([[p]])
            for layer in range(j + 1):
                past = [(torch.from_numpy(cache.segments[layer].keys[0][:, :, :p]),
                         torch.from_numpy(cache.segments[layer].values[0][:, :, :p]))]
                masks = fam.attention_masks(torch.ones(1, p + 1, dtype=torch.long), 1, h.dtype)
                h = fam.run_layer(layer, h, masks, pos, fam.position_embeddings(h, pos), LayerCache(layer, past))
            for layer in range(j + 1, 4):  # skipped: K/V of the layer itself, fed the exited state
                lc = LayerCache(layer)
                one = fam.attention_masks(torch.ones(1, 1, dtype=torch.long), 1, h.dtype)
                fam.run_layer(layer, h, one, pos, fam.position_embeddings(h, pos), lc)
                k_ref, v_ref = lc.presents()[0]
                k = cache.segments[layer].keys[0][:, :, p:p + 1]
                v = cache.segments[layer].values[0][:, :, p:p + 1]
                assert np.abs(k - k_ref.numpy()).max() < 1e-4 and np.abs(v - v_ref.numpy()).max() < 1e-4
    # and no deeper layer ran attention/MLP on them: the count is the exit layers only
    assert [s.layer_positions for s in stats] == [16, 4, 1, 2, 4, 1, 3, 4, 1]


def test_fill_needs_fill_graphs(export, tmp_path):
    import json
    import shutil

    folder, _ = export
    dst = tmp_path / "old"
    shutil.copytree(folder, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for s in m["segments"]:
        s.pop("kv_fill", None)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="re-export"):
        Runtime.load(dst, kv_policy="fill")
    Runtime.load(dst)  # defer still works


def test_the_buffer_layout_too(tmp_path):
    """The module's export uses the concat KV layout; the same guarantees on preallocated buffers."""
    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16")  # GroupQueryAttention needs head size % 16 == 0
    folder = api.export(ckpt, out=tmp_path / "onnx", backbone=bb, kv="buffer", kv_capacity=64)
    rt = Runtime.load(folder)
    assert rt.manifest.kv_cache.layout == "buffer"
    full = rt.generate(PROMPT, 16, thresholds="never", stop_at_eos=False)
    assert rt.generate(PROMPT, 16, thresholds=[0.0] * 3, stop_at_eos=False, exact=True).tokens == full.tokens
    _, stats = run(Runtime.load(folder, kv_policy="fill"), list(range(10, 20)), [3, 0, 0, 2, 3, 1])
    assert [s.fill_positions for s in stats] == [0, 3, 3, 1, 0, 2]
    rt = Runtime.load(folder, max_pending=100)
    cache, _ = run(rt, list(range(30, 37)), [3, 0, 0, 0])
    before = cache.mark()
    good, rt.backends[2] = rt.backends[2], Failing(rt.backends[2])
    with pytest.raises(RuntimeError, match="device lost"):
        rt.step(np.array([40]), cache, forced(3))
    rt.backends[2] = good
    assert [st.length for st in cache.segments] == list(before.lengths) and cache.pending_counts() == [0, 3, 0, 0]
    rt.step(np.array([40]), cache, forced(3))
    ref, _ = run(rt, list(range(30, 37)) + [40], [3, 0, 0, 0, 3])
    assert_same_cache(cache, ref)
