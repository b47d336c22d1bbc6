"""The KV-buffer chain's per-call binding (runtime/backends.py `run_bound`): inputs copied into
arrays bound once per shape, outputs kept bound while the inputs' shapes stay, read lazily.
It must give, call for call, the numbers of the path it replaced (every input and output bound
again per call), through prefill, decode, several positions per call, rollbacks and a kept cache."""

import numpy as np
import pytest
from conftest import make_checkpoint

from exporter import api
from runtime import Runtime
from runtime.backends import BoundOutputs

CAPACITY = 64


@pytest.fixture(scope="module")
def buffer_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("overhead")
    ckpt, bb = make_checkpoint(d, "llama_hd16")
    return api.export(ckpt, out=d / "buffer", with_logits=True, kv="buffer", kv_capacity=CAPACITY, backbone=bb)


class Rebinding:
    """The path before: every feed and every free output bound again on each call, outputs read
    with IOBinding.get_outputs(). The rest delegates to the real backend."""

    def __init__(self, backend):
        self.backend, self.input_names = backend, backend.input_names

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run_bound(self, binding, feeds):
        io = binding.io
        for k, v in feeds.items():
            if k in self.input_names:
                io.bind_cpu_input(k, np.array(v))
        for name in binding.free:
            io.bind_output(name)
        self.backend.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return {name: outs[i].numpy().copy() for i, name in enumerate(binding.free)}


class Recorder:
    """Every call's segment, input shapes and outputs (all of them, read right after the call)."""

    def __init__(self, backend, j, log):
        self.backend, self.j, self.log, self.input_names = backend, j, log, backend.input_names

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run_bound(self, binding, feeds):
        out = self.backend.run_bound(binding, feeds)
        self.log.append((self.j, {k: np.shape(v) for k, v in feeds.items()}, {k: np.array(out[k]) for k in out}))
        return out


class Draft:
    """Proposes the same made-up tokens every step: several positions per call, most rejected."""

    name = "fixed"

    def propose(self, history, k):
        return [history[-1], 7, 11][:k]


def scenario(rt):
    """Generations that take every path of the step: returns their tokens."""
    n_exits = len(rt.manifest.exits)
    out = [rt.generate("It is a truth", 10, thresholds="never", stop_at_eos=False).tokens,
           # every token leaves at the first exit: deferred positions, caught up several at a time
           rt.generate("It is a truth", 10, thresholds=[0.0] * n_exits, stop_at_eos=False).tokens,
           # exact mode, exits and drafts: several positions per call, rollbacks of rejected ones
           rt.generate("However little", 12, thresholds=[0.0] * n_exits, exact=True, drafts=[Draft()],
                       stop_at_eos=False).tokens,
           # exact sampling: per-position rows of the last segment checked after one call
           rt.generate("However little", 12, thresholds=[0.0] * n_exits, exact=True, drafts=[Draft()],
                       temperature=0.9, seed=3, stop_at_eos=False).tokens]
    first = rt.generate("It is a truth universally", 6, thresholds="never", stop_at_eos=False)
    again = rt.generate("It is a truth acknowledged", 6, thresholds="never", stop_at_eos=False, reuse_cache=True)
    assert again.cached_tokens > 0  # the kept cache was cut back and reused
    return out + [first.tokens, again.tokens]


def run(folder, rebind: bool):
    rt = Runtime.load(folder)
    log = []
    rt.backends = [Recorder(Rebinding(b) if rebind else b, j, log) for j, b in enumerate(rt.backends)]
    return scenario(rt), log


def test_bound_outputs_equal_the_rebinding_path(buffer_export):
    new_tokens, new_log = run(buffer_export, rebind=False)
    old_tokens, old_log = run(buffer_export, rebind=True)
    assert new_tokens == old_tokens
    assert len(new_log) == len(old_log)
    assert {n for _, shapes, _ in new_log for n in [shapes[next(iter(shapes))][1]]} >= {1, 2, 3}  # several sizes
    for (j, shapes, out), (j_old, shapes_old, out_old) in zip(new_log, old_log):
        assert (j, shapes) == (j_old, shapes_old)
        assert out.keys() == out_old.keys()
        for k in out:
            assert out[k].shape == out_old[k].shape and np.array_equal(out[k], out_old[k]), (j, k)


def test_outputs_of_an_earlier_run_refuse_to_read(buffer_export):
    rt = Runtime.load(buffer_export)
    cache = rt.new_cache()
    th = rt.resolve_thresholds("never")
    rt.step(np.array(rt.encode("It is").tolist()), cache, th)
    seg, backend, binding = rt.manifest.segments[0], rt.backends[0], cache.bindings[0]
    run = lambda p: cache.run(0, seg, backend, np.array([[5]], dtype=np.int64), p)  # noqa: E731
    cache.truncate(2)
    first = run(3)
    assert isinstance(first, BoundOutputs) and set(first) == set(binding.free)
    hidden = first["hidden_out"]  # read: a copy, kept as it is
    cache.truncate(2)
    second = run(3)  # same inputs: the same numbers, written into the same memory
    assert np.array_equal(second["hidden_out"], hidden)
    with pytest.raises(RuntimeError, match="overwritten by a later run"):
        first["confidence"]
    assert np.array_equal(first["hidden_out"], hidden)  # what was read stays readable
