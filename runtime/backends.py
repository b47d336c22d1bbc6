"""Backends run one segment graph: feeds by name in, outputs by name out.

A backend is anything with `run(feeds) -> dict` and `input_names`; `open_backend` picks
one from the `providers=` argument. Each backend class can be asked whether it is usable
here (`available()`), so the runtime and the tests can say why a path is skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import roles as R
from .errors import BackendError
from .manifest import SegmentSpec


class Backend(Protocol):
    input_names: set[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


THREAD_POOLS = ("shared", "session")
_shared_pool: dict[str, int | None] = {}
# onnxruntime keeps one environment per process, with or without a shared pool, while any
# session lives; these are its words when a session asks for the other kind
_POOL_CLASH = {"EnvCreatedWithGlobalThreadPools": "session", "must be false when using a global": "shared"}


def shared_thread_pool(threads: int | None) -> bool:
    """Size (once per process) the onnxruntime thread pool that sessions share: `threads`
    threads (None: onnxruntime's default, one per core). False when an earlier call fixed
    another size, which then stays (onnxruntime cannot resize it)."""
    if "threads" not in _shared_pool:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)  # 0: onnxruntime's default size
        _shared_pool["threads"] = threads
    return _shared_pool["threads"] == threads


def _session_options(ort, pool: str, threads: int | None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if pool == "shared":
        # one spinning pool for every session of the chain: a segment's small ops do not wait
        # for sleeping threads to wake (SmolLM2 int4 chains 1.05-1.09x, within noise, at load 2-3.6:
        # benchmarks/results/smollm2-135m/thread_pools/)
        opts.use_per_session_threads = False
    else:
        # spinning threads of N per-session pools fight for the same cores: a chain of 8
        # segments ran 5x slower with the default (../shared/KNOWN.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
    return opts


class OnnxRuntimeBackend:
    """onnxruntime InferenceSession with settings that suit a chain of small graphs."""

    name = "onnxruntime"
    GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                               "MIGraphXExecutionProvider", "DmlExecutionProvider"})

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 thread_pool: str = "session"):
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        if thread_pool not in THREAD_POOLS:
            raise ValueError(f"thread_pool must be one of {THREAD_POOLS}, got {thread_pool!r}")
        pool = thread_pool if providers == ["CPUExecutionProvider"] else "session"
        if "threads" in _shared_pool:  # this process made the shared pool: onnxruntime allows no other kind now
            pool = "shared"
        if pool == "shared" and not shared_thread_pool(threads):
            size = _shared_pool["threads"] or "onnxruntime's default number of"
            warnings.warn(f"onnxruntime's shared thread pool already has {size} threads in this process; "
                          f"sessions asking for {threads} run on it", stacklevel=3)
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            hint = (" (GPU providers need the onnxruntime-gpu package in place of onnxruntime)"
                    if set(unknown) & self.GPU_PROVIDERS else "")
            raise BackendError(f"onnxruntime providers {unknown} are not available here "
                                f"(available: {ort.get_available_providers()}){hint}")
        try:
            try:
                self.session = ort.InferenceSession(str(path), sess_options=_session_options(ort, pool, threads),
                                                    providers=providers)
            except Exception as e:
                other = next((p for k, p in _POOL_CLASH.items() if k in str(e)), None)
                if other is None:
                    raise
                pool = other  # the process's sessions already use the other kind of pool
                self.session = ort.InferenceSession(str(path), sess_options=_session_options(ort, pool, threads),
                                                    providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise BackendError(f"{path.name}: onnxruntime cannot load this graph ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]})") from None
        self.thread_pool = pool
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.check_providers(providers, self.providers, path.name)

    @classmethod
    def check_providers(cls, requested: list[str], active: list[str], where: str = "session") -> None:
        """onnxruntime-gpu lists its GPU providers even where the CUDA/cuDNN libraries are missing,
        and then quietly runs on the CPU (../shared/KNOWN.md): refuse that instead of being slow."""
        lost = [p for p in requested if p in cls.GPU_PROVIDERS and p not in active]
        if lost:
            raise BackendError(
                f"{where}: onnxruntime was asked for {lost} but fell back to {active}: the provider could not be "
                f"initialized, usually because the CUDA / cuDNN (or TensorRT) libraries that onnxruntime-gpu was "
                f"built against are missing or mismatched (onnxruntime logs the reason when the session is "
                f"created). Install them, or run on the CPU by leaving providers unset")

    @staticmethod
    def available(provider: str = "CPUExecutionProvider") -> bool:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        return provider in ort.get_available_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.output_names, outs))

    # -- in-place KV buffers (layout "buffer", runtime/kv_buffer.py) -----------------------
    def bind_inplace(self, pairs: list[tuple[str, str, np.ndarray]]) -> "InPlaceBinding":
        """An IOBinding in which each (input, output, array) reads and writes `array` itself.

        The graph's GroupQueryAttention then updates the buffer in place: no copy of the
        cache per call. The arrays must stay alive (and C-contiguous) as long as the binding.
        """
        import onnxruntime as ort

        if self.providers[0] != "CPUExecutionProvider":
            raise BackendError(f"the KV buffer layout runs on onnxruntime's CPU provider only (this session "
                                f"uses {self.providers[0]}); export with --kv concat for other providers")
        io = self.session.io_binding()
        bound = {o for _, o, _ in pairs}
        free = [n for n in self.output_names if n not in bound]
        for name in free:  # bound first so that they are the first len(free) outputs of a run
            io.bind_output(name)
        for i, o, arr in pairs:
            if not arr.flags.c_contiguous:
                raise ValueError(f"KV buffer for {i} must be C-contiguous")
            value = ort.OrtValue.ortvalue_from_numpy(arr)  # a view of the array's memory
            io.bind_ortvalue_input(i, value)
            io.bind_ortvalue_output(o, value)
        # the free outputs' shapes follow the inputs' when each of their named dimensions is an
        # input's (ONNX: equal names, equal sizes): then they stay bound while the inputs' shapes do
        dims = {d for x in self.session.get_inputs() for d in x.shape if isinstance(d, str)}
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        follow = all(isinstance(d, int) or (isinstance(d, str) and d in dims) for n in free for d in shapes[n])
        return InPlaceBinding(io, free, pairs, follow)

    def run_bound(self, binding: "InPlaceBinding", feeds: dict[str, np.ndarray]) -> "BoundOutputs":
        """Run with the KV buffers of `binding`; `feeds` are the per-call inputs. Returns the
        outputs that are not bound (token, confidence, hidden states, ...), each copied to a numpy
        array when first read: read them before this binding runs again.

        Little happens besides the graph (the runtime's work between calls went from 0.26 to
        0.13 ms a token for SmolLM2's 3-segment chain, most of it wrapping every output, the KV
        buffers' too, in a Python OrtValue: benchmarks/results/smollm2-135m/chain-overhead): each
        input is copied into an array the binding owns and has bound once per shape; the free
        outputs are bound again only when the inputs' shapes change (onnxruntime otherwise writes
        a run's outputs into the previous run's memory); only those the caller reads are copied."""
        io, held = binding.io, binding.inputs
        shapes = []
        for k, v in feeds.items():
            if k not in self.input_names:
                continue
            mine = held.get(k)
            if mine is not None and mine.shape == v.shape and mine.dtype == v.dtype:
                np.copyto(mine, v)  # onnxruntime reads the bound array's memory at run time
            else:
                mine = held[k] = np.array(v, order="C")  # the binding's own copy: callers may reuse theirs
                io.bind_cpu_input(k, mine)
            shapes.append(mine.shape)
        shapes = tuple(shapes)
        if shapes != binding.shapes or not binding.follow:
            for name in binding.free:
                io.bind_output(name)
            binding.shapes = shapes
        binding.runs += 1
        self.session.run_with_iobinding(io)
        return BoundOutputs(binding, io.get_outputs_as_ortvaluevector())


@dataclass
class InPlaceBinding:
    io: object  # onnxruntime.IOBinding
    free: list[str]  # outputs onnxruntime allocates, the first len(free) outputs of a run
    pairs: list[tuple[str, str, np.ndarray]]  # (input, output, buffer): keeps the buffers alive
    follow: bool = False  # the free outputs' shapes are fixed by the inputs' shapes
    inputs: dict = field(default_factory=dict)  # input name -> the array bound for it (the binding's own)
    shapes: tuple | None = None  # the inputs' shapes the free outputs were last bound for
    runs: int = 0  # runs so far: BoundOutputs of an earlier run refuse to read
    index: dict = field(init=False)  # free output name -> its place among a run's outputs

    def __post_init__(self):
        self.index = {name: i for i, name in enumerate(self.free)}


class BoundOutputs(Mapping):
    """One run's free outputs by name, each copied from onnxruntime's memory when first read.
    Onnxruntime writes the next run's outputs into the same memory, so reading after the
    binding ran again raises instead of returning the later run's values."""

    __slots__ = ("_binding", "_values", "_run", "_read")

    def __init__(self, binding: InPlaceBinding, values):
        self._binding, self._values, self._run, self._read = binding, values, binding.runs, {}

    def __getitem__(self, name: str) -> np.ndarray:
        got = self._read.get(name)
        if got is None:
            i = self._binding.index[name]
            if self._binding.runs != self._run:
                raise RuntimeError(f"output {name!r} of an earlier run was overwritten by a later run of the same "
                                   f"graph: read outputs before running it again")
            got = self._read[name] = self._values[i].numpy().copy()
        return got

    def __contains__(self, name) -> bool:
        return name in self._binding.index

    def __iter__(self):
        return iter(self._binding.free)

    def __len__(self) -> int:
        return len(self._binding.free)


def open_backend(folder: Path, seg: SegmentSpec, providers: list[str] | str | None = None,
                 threads: int | None = None, thread_pool: str = "session") -> Backend:
    if providers == "tensorrt" or providers == ["tensorrt"]:
        from .tensorrt import TensorRTBackend

        # the present KV stays in GPU memory and comes back as the next past: no host round trip;
        # the top-k logits stay there too unless a sampler reads them
        present = {t.name for t in seg.outputs if t.role in (R.PRESENT_KEY, R.PRESENT_VALUE, R.TOPK_VALUES,
                                                              R.TOPK_INDICES, R.TOPK_VALUES_ALL, R.TOPK_INDICES_ALL,
                                                              R.LOGITS_ALL)}
        return TensorRTBackend(folder, seg, device_outputs=present)
    if isinstance(providers, str):
        providers = [providers]
    return OnnxRuntimeBackend(folder / seg.file, providers, threads, thread_pool)
