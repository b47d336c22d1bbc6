"""TensorRT: clear failures where it cannot run, and the backend's plumbing everywhere.

CI has no GPU and cannot install tensorrt (../shared/KNOWN.md), so most tests here run the
real build and backend code against *fakes*: a `tensorrt` stand-in whose "engine" is the
segment's ONNX graph run by onnxruntime, and a cuda-python stand-in whose "device memory" is
host memory with every pointer checked against live allocations. That exercises profiles,
manifest records, version checks, buffers, shapes and the device-resident KV path; what only
real hardware can show (kernels, numerics in fp16, speed) is in the `gpu` tests at the end,
skipped with the reason when TensorRT or a GPU is absent.
"""

from __future__ import annotations

import ctypes
import enum
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_checkpoint, torch_early_exit

from exporter import api
from runtime import BackendError, ManifestError, Runtime
from runtime import tensorrt as tb
from runtime.tensorrt import versions as trt_versions
from runtime.backends import OnnxRuntimeBackend
from runtime.manifest import Manifest

PROMPT = "It is a truth universally acknowledged"
MIXED = [0.1, 0.08, 0.12]  # on the tiny llama: tokens leave at every exit, deferred KV catches up
NEEDS = "building TensorRT engines needs an NVIDIA GPU and the tensorrt package"


# -- fakes ------------------------------------------------------------------------------------
class FakeCudart:
    """cuda-python's runtime module: (err, value) tuples; device memory is host memory."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, devices: int = 1, cc=(8, 9)):
        self.devices, self.cc = devices, cc
        self.live: dict[int, np.ndarray] = {}
        self.mallocs = self.frees = self.to_device_bytes = self.to_host_bytes = self.device_copies = 0

    ok = property(lambda self: self.cudaError_t.cudaSuccess)

    def cudaGetDeviceCount(self):
        return (self.ok, self.devices) if self.devices else (self.cudaError_t.cudaErrorInsufficientDriver, None)

    def cudaGetDevice(self):
        return self.ok, 0

    def cudaDeviceGetAttribute(self, attr, dev):
        return self.ok, self.cc[0] if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else self.cc[1]

    def cudaGetDeviceProperties(self, dev):
        return self.ok, type("Prop", (), {"name": b"Fake GPU\x00\x00"})()

    def cudaMalloc(self, n):
        buf = np.zeros(max(n, 1), np.uint8)
        self.live[buf.ctypes.data] = buf
        self.mallocs += 1
        return self.ok, buf.ctypes.data

    def cudaFree(self, ptr):
        assert ptr in self.live, "free of a pointer that is not allocated"
        del self.live[ptr]
        self.frees += 1
        return (self.ok,)

    def check(self, ptr: int, n: int):
        assert ptr in self.live and self.live[ptr].nbytes >= n, "device access outside a live allocation"

    def cudaStreamCreate(self):
        return self.ok, 7

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.check(dst, n)
            self.to_device_bytes += n
        else:
            self.check(src, n)
            self.to_host_bytes += n
        ctypes.memmove(dst, src, n)
        return (self.ok,)

    def cudaMemcpy(self, dst, src, n, kind):
        return self.cudaMemcpyAsync(dst, src, n, kind, 0)

    def cudaMemcpy2D(self, dst, dpitch, src, spitch, width, height, kind):
        assert kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice and width <= min(dpitch, spitch)
        self.check(dst, (height - 1) * dpitch + width)
        self.check(src, (height - 1) * spitch + width)
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.device_copies += 1
        return (self.ok,)

    def read(self, ptr, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.check(ptr, n)
        return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), np.uint8).view(dtype).reshape(shape).copy()


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeTensorRT:
    """The slice of the tensorrt module the backend uses. The serialized "engine" is a JSON
    header (version, profile) plus the ONNX graph, run by onnxruntime."""

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class BuilderFlag(enum.Enum):
        FP16 = 0

    def __init__(self, cuda: FakeCudart, version: str = "10.9.0.34"):
        self.cuda, self.__version__ = cuda, version
        self.built = []  # (onnx name, flags, workspace, profile) per build
        fake = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0
                return type("Network", (), {"inputs": [], "path": None})()

            def create_builder_config(self):
                return FakeConfig()

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                profile = config.profiles[0].shapes
                if set(profile) != set(network.inputs):
                    return None
                fake.built.append((network.path.name, config.flags, config.workspace, profile))
                header = json.dumps({"version": fake.__version__, "profile": profile}).encode()
                return header + b"\n" + network.path.read_bytes()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx
                from pathlib import Path

                model = onnx.load(path)
                self.network.inputs = [i.name for i in model.graph.input]
                self.network.num_inputs = len(self.network.inputs)
                self.network.get_input = lambda i: type("T", (), {"name": self.network.inputs[i]})()
                self.network.path = Path(path)
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                header, graph = data.split(b"\n", 1)
                header = json.loads(header)
                if header["version"] != fake.__version__:
                    return None
                return FakeEngine(fake.cuda, graph, header["profile"])

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


class FakeConfig:
    def __init__(self):
        self.flags, self.workspace, self.profiles = set(), None, []

    def set_memory_pool_limit(self, pool, n):
        self.workspace = n

    def set_flag(self, flag):
        self.flags.add(flag.name)

    def add_optimization_profile(self, p):
        self.profiles.append(p)


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeEngine:
    def __init__(self, cuda, graph: bytes, profile: dict):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.cuda, self.profile = cuda, profile
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.io = [(i.name, FakeTensorRT.TensorIOMode.INPUT, ORT_TYPES[i.type]) for i in self.session.get_inputs()]
        self.io += [(o.name, FakeTensorRT.TensorIOMode.OUTPUT, ORT_TYPES[o.type]) for o in self.session.get_outputs()]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _io(self, name):
        return next(x for x in self.io if x[0] == name)

    def get_tensor_mode(self, name):
        return self._io(name)[1]

    def get_tensor_dtype(self, name):
        return self._io(name)[2]

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        if not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def _compute(self):
        feeds = {n: self.engine.cuda.read(self.addresses[n], self.shapes[n], t)
                 for n, mode, t in self.engine.io if mode == FakeTensorRT.TensorIOMode.INPUT}
        return dict(zip([o.name for o in self.engine.session.get_outputs()], self.engine.session.run(None, feeds)))

    def get_tensor_shape(self, name):
        return self._compute()[name].shape  # shapes follow from the input shapes, as in TensorRT

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        for name, out in self._compute().items():
            self.engine.cuda.check(self.addresses[name], out.nbytes)
            ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
        return True


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install the fakes; returns (tensorrt, cudart) so a test can change version or GPU."""
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart)
    monkeypatch.setattr(trt_versions, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_versions, "import_cudart", lambda: cudart)
    return trt, cudart


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    ckpt, bb = make_checkpoint(d, "llama")
    return api.export(ckpt, out=d / "onnx", backbone=bb), ckpt, bb


@pytest.fixture
def engines(onnx_export, fake_gpu, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_export[0], folder)
    tb.build_engines_on_device(folder, limits={"sequence": 64}, log=lambda m: None)
    return folder


# -- no GPU, no tensorrt: clear errors ----------------------------------------------------------
def test_check_can_build_without_tensorrt(monkeypatch):
    from exporter.tensorrt_build import check_can_build

    def missing():
        raise ImportError("No module named 'tensorrt'")

    monkeypatch.setattr(trt_versions, "import_tensorrt", missing)
    with pytest.raises(RuntimeError, match=f"{NEEDS}.*use --backend onnx.*tensorrt package cannot be imported"):
        check_can_build()


def test_check_can_build_without_gpu(monkeypatch):
    from exporter.tensorrt_build import check_can_build

    cudart = FakeCudart(devices=0)
    monkeypatch.setattr(trt_versions, "import_tensorrt", lambda: FakeTensorRT(cudart))
    monkeypatch.setattr(trt_versions, "import_cudart", lambda: cudart)
    with pytest.raises(RuntimeError, match=f"{NEEDS}.*no CUDA GPU is visible.*InsufficientDriver"):
        check_can_build()
    assert not tb.TensorRTBackend.available()
    assert "no CUDA GPU" in tb.TensorRTBackend.unavailable_reason()


def test_check_can_build_old_tensorrt(monkeypatch):
    from exporter.tensorrt_build import check_can_build

    monkeypatch.setattr(trt_versions, "import_tensorrt", lambda: FakeTensorRT(FakeCudart(), version="8.6.1"))
    with pytest.raises(RuntimeError, match="TensorRT 8.6.1 is too old"):
        check_can_build()


def test_cli_export_tensorrt_without_gpu_fails_cleanly(onnx_export, tmp_path, monkeypatch, capsys):
    """The real environment here: no tensorrt, no GPU. The command fails fast, says why and
    what to do instead, and leaves no output folder behind."""
    from lama import cli

    if tb.TensorRTBackend.available():
        pytest.skip("this machine can build TensorRT engines")
    _, ckpt, _ = onnx_export
    out = tmp_path / "runs" / "trt"
    assert cli.main(["export", str(ckpt), "--out", str(out), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert NEEDS in err and "use --backend onnx" in err
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_runtime_tensorrt_without_gpu_is_a_backend_error(engines, monkeypatch):
    monkeypatch.setattr(trt_versions, "import_cudart", lambda: FakeCudart(devices=0))
    with pytest.raises(BackendError, match="running TensorRT engines needs an NVIDIA GPU.*leave providers unset"):
        Runtime.load(engines, providers="tensorrt")


def test_no_engine_in_manifest(onnx_export, fake_gpu):
    with pytest.raises(ManifestError, match=r"has no TensorRT engine.*python -m runtime.tensorrt"):
        Runtime.load(onnx_export[0], providers="tensorrt")


@pytest.fixture(scope="module")
def gated_export(tmp_path_factory):
    """Gate mode: segments output the gate score, the exit head is a separate graph (untrained
    random gates are enough to exercise the plumbing)."""
    d = tmp_path_factory.mktemp("trt_gate")
    ckpt, bb = make_checkpoint(d, "llama", thresholds=[0.5, 0.5, 0.5], gates=True)
    return api.export(ckpt, out=d / "onnx", backbone=bb)


def test_gate_mode_head_graphs_get_engines(gated_export, fake_gpu, tmp_path):
    """The on-demand exit head graph gets its own engine record, and the TensorRT chain
    reproduces onnxruntime's tokens and exits in gate mode."""
    folder = tmp_path / "export"
    shutil.copytree(gated_export, folder)
    m = tb.build_engines_on_device(folder, limits={"sequence": 64}, log=lambda m: None)
    assert m.heads and all(h.engine and (folder / h.engine["file"]).is_file() for h in m.heads)
    assert Manifest.load(folder).heads[0].engine == m.heads[0].engine
    ref, rt = Runtime.load(folder), Runtime.load(folder, providers="tensorrt")
    for thresholds in ("never", [0.0, 0.0, 0.0], None):
        a, b = ref.generate(PROMPT, 12, thresholds=thresholds), rt.generate(PROMPT, 12, thresholds=thresholds)
        assert b.tokens == a.tokens and [r.segment for r in b.records] == [r.segment for r in a.records]
    with pytest.raises(ManifestError, match="graph head.onnx has no TensorRT engine"):
        tb.TensorRTBackend(gated_export, Manifest.load(gated_export).heads[0])


# -- engine portability checks ------------------------------------------------------------------
def test_engine_compatibility_check():
    engine = {"tensorrt_version": "10.9.0.34", "compute_capability": "8.7"}
    tb.check_engine_compatible(engine, "10.9.0.34", "8.7")
    with pytest.raises(BackendError, match=r"built with TensorRT 10.9.0.34, this device has TensorRT 10.13.0.*"
                                           r"not portable.*python -m runtime.tensorrt runs/x"):
        tb.check_engine_compatible(engine, "10.13.0", "8.7", folder="runs/x")
    with pytest.raises(BackendError, match=r"built for compute capability 8.7, this GPU is 9.0.*not portable"):
        tb.check_engine_compatible(engine, "10.9.0.34", "9.0")
    with pytest.raises(BackendError, match=r"TensorRT None.*compute capability None"):
        tb.check_engine_compatible({}, "10.9.0.34", "9.0")


def test_engine_from_other_device_is_refused(engines, fake_gpu):
    trt, cudart = fake_gpu
    cudart.cc = (9, 0)
    with pytest.raises(BackendError, match="built for compute capability 8.9, this GPU is 9.0.*not portable"):
        Runtime.load(engines, providers="tensorrt")
    cudart.cc = (8, 9)
    trt.__version__ = "10.13.0.35"
    with pytest.raises(BackendError, match="built with TensorRT 10.9.0.34, this device has TensorRT 10.13.0.35"):
        Runtime.load(engines, providers="tensorrt")
    # the advertised fix works: rebuild on this device, then it loads
    assert tb.main([str(engines), "--max-sequence", "64"]) == 0
    Runtime.load(engines, providers="tensorrt")


def test_corrupted_or_missing_engine(engines, fake_gpu):
    p = engines / "segment_01.engine"
    p.write_bytes(p.read_bytes()[:-1] + b"x")
    with pytest.raises(ManifestError, match="segment_01.engine does not match its sha256"):
        Runtime.load(engines, providers="tensorrt")
    p.unlink()
    with pytest.raises(ManifestError, match="engine file segment_01.engine is missing"):
        Runtime.load(engines, providers="tensorrt")


# -- profiles and the manifest record ------------------------------------------------------------
def test_profile_dims(onnx_export):
    from runtime.manifest import Manifest

    m = Manifest.load(onnx_export[0])
    ctx = m.model.max_context
    dims = tb.profile_dims(m)
    assert dims["batch"] == (1, 1, 8)
    # None max = the context; past + sequence never exceeds it (the tiny model's context is 256)
    assert dims["sequence"] == (1, 1, ctx) and dims["past"] == (0, ctx - 1, ctx - 1) and dims["total"] == (1, ctx, ctx)
    small = tb.profile_dims(m, {"batch": 1, "sequence": 16, "past": 100})
    assert small["batch"] == (1, 1, 1) and small["sequence"] == (1, 1, 16)
    assert small["past"] == (0, 100, 100) and small["total"] == (1, 101, 116)
    with pytest.raises(ValueError, match="unknown dims"):
        tb.profile_dims(m, {"heads": 4})
    shapes = tb.input_profiles(m.segments[1], small)
    kv = shapes["past_key.1"]
    assert kv == ((1, m.model.num_kv_heads, 0, m.model.head_dim), (1, m.model.num_kv_heads, 100, m.model.head_dim),
                  (1, m.model.num_kv_heads, 100, m.model.head_dim))
    assert shapes["hidden"][2] == (1, 16, m.model.hidden_size)


def test_build_records_engines_in_manifest(engines, fake_gpu):
    from runtime.manifest import Manifest

    trt, _ = fake_gpu
    m = Manifest.load(engines)  # the JSON round trip keeps the engine records
    for seg in m.segments:
        e = seg.engine
        assert e["file"] == f"segment_{seg.index:02d}.engine" and (engines / e["file"]).stat().st_size == e["size"]
        assert e["tensorrt_version"] == "10.9.0.34" and e["compute_capability"] == "8.9"
        assert e["device"] == "Fake GPU" and e["build_seconds"] >= 0 and not e["fp16_flag"]
        assert set(e["profile"]) == {t.name for t in seg.inputs}
    name, flags, workspace, profile = trt.built[0]
    assert name == "segment_00.onnx" and flags == set() and workspace == 2 << 30
    assert profile["input_ids"] == [[1, 1], [1, 1], [8, 64]]


def test_export_with_tensorrt_backend(onnx_export, fake_gpu, tmp_path):
    """`lama export --backend tensorrt` end to end with the fakes: fp16 sets the builder flag."""
    trt, _ = fake_gpu
    _, ckpt, _ = onnx_export
    from conftest import tiny_backbone

    out = api.export(ckpt, out=tmp_path / "trt16", backend="tensorrt", precision="fp16", workspace_gb=0.5,
                     backbone=tiny_backbone("llama"))
    m = json.loads((out / "manifest.json").read_text())
    assert all(s["engine"]["fp16_flag"] and s["engine"]["workspace_gb"] == 0.5 for s in m["segments"])
    assert all(flags == {"FP16"} and ws == 1 << 29 for _, flags, ws, _ in trt.built)
    assert sorted(p.name for p in out.glob("*.engine")) == [f"segment_{i:02d}.engine" for i in range(4)]


# -- the backend's plumbing ---------------------------------------------------------------------
def test_tensorrt_chain_matches_pytorch(engines, onnx_export, fake_gpu):
    """The TensorRT backend's chain against the PyTorch model (not against onnxruntime: the
    fake engine *is* the ONNX graph, so that comparison could not fail): same tokens, exits
    and confidences as the early-exit rule computed with no cache at all."""
    from exporter.checkpoint import load_heads

    _, cudart = fake_gpu
    _, ckpt, bb = onnx_export
    heads = load_heads(ckpt, bb)
    rt = Runtime.load(engines, providers="tensorrt")
    prompt = rt.encode(PROMPT).tolist()
    for thresholds in ("never", [0.0, 0.0, 0.0], MIXED, [float("inf"), 0.0, float("inf")]):
        th = rt.resolve_thresholds(thresholds)
        tokens, exits, confs = torch_early_exit(bb, heads, prompt, 16, th)
        b = rt.generate(prompt, 16, thresholds=thresholds, stop_at_eos=False)
        assert list(b.tokens) == tokens
        assert [r.segment for r in b.records] == exits
        assert np.allclose([r.confidence for r in b.records], confs, atol=1e-4)
        if thresholds is MIXED:
            assert len(set(exits)) == 4  # really mixes the exits
    # the buffer pools recycle: allocations stay bounded while tokens go on
    before = cudart.mallocs
    rt.generate(PROMPT, 24, thresholds="never")
    assert cudart.mallocs - before <= 2 * 3 * sum(len(b.outputs) for b in rt.backends)


def test_kv_stays_on_device(engines, fake_gpu):
    """Runtime's tensorrt backends return the present KV as DeviceArrays and take them back as
    the next past: per decoded token, only ids/hidden states cross to the device, never the KV."""
    _, cudart = fake_gpu
    rt = Runtime.load(engines, providers="tensorrt")
    cache = rt.new_cache()
    th = rt.resolve_thresholds("never")
    rt.step(rt.encode(PROMPT), cache, th)
    assert all(isinstance(k, tb.DeviceArray) for st in cache.segments for k in st.keys + st.values)
    sent, got = cudart.to_device_bytes, cudart.to_host_bytes
    for t in range(5):
        rt.step(np.array([t + 10]), cache, th)
    m = rt.manifest.model
    cache_bytes = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * cache.position  # the whole KV cache
    assert cudart.to_device_bytes - sent < cache_bytes / 2  # over 5 tokens: not even half of it once
    assert cudart.to_host_bytes - got < cache_bytes / 2
    # the cache reads back as numpy, equal to onnxruntime's
    ref = rt.__class__.load(engines)
    ref_cache = ref.new_cache()
    ref.step(ref.encode(PROMPT), ref_cache, th)
    for t in range(5):
        ref.step(np.array([t + 10]), ref_cache, th)
    for st, rs in zip(cache.segments, ref_cache.segments):
        for a, b in zip(st.keys + st.values, rs.keys + rs.values):
            assert np.abs(np.asarray(a) - b).max() < 1e-5


def test_device_array_narrow_copies_on_the_device(fake_gpu):
    _, cudart = fake_gpu
    pool = tb.DevicePool(tb.Cuda(cudart))
    host = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    a = tb.DeviceArray(pool.acquire(host.nbytes), host.shape, host.dtype, pool)
    cudart.cudaMemcpy(a.ptr, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
    sent, got = cudart.to_device_bytes, cudart.to_host_bytes
    for axis, n in ((2, 3), (1, 1), (3, 2), (2, 0)):
        cut = a.narrow(axis, n)
        assert isinstance(cut, tb.DeviceArray) and cut.shape == host[(slice(None),) * axis + (slice(0, n),)].shape
        assert (cudart.to_device_bytes, cudart.to_host_bytes) == (sent, got)  # no host round trip
        np.testing.assert_array_equal(np.asarray(cut), host[(slice(None),) * axis + (slice(0, n),)])
        got = cudart.to_host_bytes
    assert a.narrow(2, 5) is a
    with pytest.raises(ValueError, match="cannot narrow"):
        a.narrow(2, 6)


def _count_host_reads(monkeypatch) -> list:
    """Calls that bring a DeviceArray to host memory (numpy(), np.asarray)."""
    reads = []
    real = tb.DeviceArray.numpy
    monkeypatch.setattr(tb.DeviceArray, "numpy", lambda self: reads.append(self.shape) or real(self))
    return reads


def test_truncate_keeps_the_kv_on_the_device(engines, fake_gpu, monkeypatch):
    """One truncation for every backend (issue 26): the TensorRT cache is cut on the device,
    to the same keys and values as onnxruntime's cache cut at the same position."""
    _, cudart = fake_gpu
    rt, ref = Runtime.load(engines, providers="tensorrt"), Runtime.load(engines)
    caches = rt.new_cache(), ref.new_cache()
    th = rt.resolve_thresholds(MIXED)
    for r, cache in zip((rt, ref), caches):
        r.step(r.encode(PROMPT), cache, th)
        for t in range(8):
            r.step(np.array([t + 10]), cache, th)
    assert any(st.pending is not None for st in caches[1].segments)  # deferred states are cut too
    reads = _count_host_reads(monkeypatch)
    copies = cudart.device_copies
    keep = caches[0].position - 5
    for cache in caches:
        cache.truncate(keep)
    assert not reads and cudart.device_copies > copies
    assert all(isinstance(a, tb.DeviceArray) for st in caches[0].segments for a in st.keys + st.values)
    for st, rs in zip(*(c.segments for c in caches)):
        assert st.length == rs.length and st.pending_count == rs.pending_count
        for a, b in zip(st.keys + st.values, rs.keys + rs.values):
            assert np.abs(np.asarray(a) - b).max() < 1e-5


def test_exact_mode_and_cache_reuse_on_tensorrt(engines, fake_gpu, monkeypatch):
    """Exact mode's rollbacks and a kept cache reused for a new prompt both cut the cache; on
    the TensorRT backend that stays on the device (it was copied to the host, or the kept cache
    refused), and the tokens are onnxruntime's."""
    rt, ref = Runtime.load(engines, providers="tensorrt"), Runtime.load(engines)
    reads = _count_host_reads(monkeypatch)
    exact = rt.generate(PROMPT, 16, thresholds=MIXED, exact=True, stop_at_eos=False)
    assert sum(r.rollbacks for r in exact.records) > 0  # the cache was cut
    assert not reads
    assert exact.tokens == ref.generate(PROMPT, 16, thresholds="never", stop_at_eos=False).tokens
    ids = list(exact.prompt_tokens) + list(exact.tokens)
    new = ids[:len(ids) - 4] + [11, 12]  # shares all but the last 4 ids with the kept cache
    again = rt.generate(new, 6, thresholds="never", reuse_cache=True, stop_at_eos=False)
    assert again.cached_tokens == len(ids) - 4 and not reads
    assert again.tokens == ref.generate(new, 6, thresholds="never", stop_at_eos=False).tokens


def test_backend_run_returns_numpy_by_default(engines, fake_gpu):
    from runtime.manifest import Manifest

    m = Manifest.load(engines)
    seg = m.segments[1]
    be = tb.TensorRTBackend(engines, seg)
    x = np.random.default_rng(0).standard_normal((1, 3, m.model.hidden_size)).astype(np.float32)
    kv = np.zeros((1, m.model.num_kv_heads, 0, m.model.head_dim), np.float32)
    feeds = {"hidden": x, "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.arange(3)[None],
             "unused_extra": np.zeros(1)}
    feeds.update({t.name: kv for t in seg.inputs if t.role in ("past_key", "past_value")})
    out = be.run(feeds)
    assert all(isinstance(v, np.ndarray) for v in out.values())
    ort_out = OnnxRuntimeBackend(engines / seg.file).run(feeds)
    for k, v in ort_out.items():
        assert np.allclose(out[k], v, atol=1e-6), k
    # a device array fed back equals the host array it came from
    dev = be.run(feeds, device_outputs={"present_key.1", "present_value.1"})
    assert isinstance(dev["present_key.1"], tb.DeviceArray) and dev["present_key.1"].shape == (1, 2, 3, 8)
    assert np.array_equal(np.asarray(dev["present_key.1"]), out["present_key.1"])
    feeds2 = {**feeds, "hidden": x[:, :1], "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.array([[3]]),
              "past_key.1": dev["present_key.1"], "past_value.1": dev["present_value.1"]}
    host2 = be.run({**feeds2, "past_key.1": out["present_key.1"], "past_value.1": out["present_value.1"]})
    again = be.run(feeds2)
    assert all(np.array_equal(again[k], host2[k]) for k in host2)
    with pytest.raises(ValueError, match="input 'position_ids' is missing"):
        be.run({k: v for k, v in feeds.items() if k != "position_ids"})
    with pytest.raises(ValueError, match=r"outside the engine's profile.*--max-sequence"):
        be.run({**feeds, "hidden": np.zeros((1, 65, m.model.hidden_size), np.float32),
                "attention_mask": np.ones((1, 65), np.int64), "position_ids": np.arange(65)[None]})
    be.close()


def test_device_buffers_are_released(fake_gpu):
    _, cudart = fake_gpu
    cuda = tb.Cuda(cudart)
    pool = tb.DevicePool(cuda, keep=2)
    a = tb.DeviceArray(pool.acquire(1000), (250,), np.float32, pool)
    ptr = a.ptr
    del a
    assert [b.ptr for b in pool.free] == [ptr]  # back in the pool, not freed
    b = tb.DeviceArray(pool.acquire(900), (225,), np.float32, pool)
    assert b.ptr == ptr and pool.allocations == 1  # reused
    bufs = [pool.acquire(10) for _ in range(4)]
    for buf in bufs:
        pool.release(buf)
    assert len(pool.free) == 2 and cudart.frees == 2
    pool.close()
    del b
    assert set(cudart.live) == set()


def test_gpu_bench_runs(onnx_export, fake_gpu, tmp_path, monkeypatch):
    """The GPU benchmark script end to end, with the fakes standing in for TensorRT.

    The fake engine runs the same ONNX graphs as onnxruntime, so the report's token parity
    with ort-cpu checks the TensorRT backend's plumbing (engines, profiles, device buffers,
    the KV kept on or copied off the device), not TensorRT's numerics (those need a GPU: the
    `gpu` tests below). What is checked here is that the TensorRT columns really ran through
    `TensorRTBackend` with the KV where each variant says, on 6 tokens per prompt, and that
    the parity field can report a divergence. Speeds are not checked: the fakes' are meaningless."""
    import importlib.util
    from pathlib import Path

    _, cudart = fake_gpu
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs, real_bench = [], bench.bench

    def spied(rt, *args, **kwargs):  # per backend variant: its backends and the bytes it moved to the host
        calls, real_run = [], tb.TensorRTBackend.run
        monkeypatch.setattr(tb.TensorRTBackend, "run", lambda self, *a, **k: calls.append(1) or real_run(self, *a, **k))
        got = cudart.to_host_bytes
        out = real_bench(rt, *args, **kwargs)
        monkeypatch.setattr(tb.TensorRTBackend, "run", real_run)
        runs.append({"kinds": {type(b).__name__ for b in rt.backends}, "device_kv": bool(rt.backends[0].device_outputs)
                     if isinstance(rt.backends[0], tb.TensorRTBackend) else None,
                     "trt_calls": len(calls), "to_host": cudart.to_host_bytes - got})
        return out

    monkeypatch.setattr(bench, "bench", spied)
    out = tmp_path / "bench.json"
    assert bench.main([str(onnx_export[0]), "--tokens", "6", "--repeat", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"]["name"] == "Fake GPU" and len(report["build"]["segments"]) == 4
    for backend in ("ort-cpu", "tensorrt", "tensorrt-host-kv"):
        for mode in ("full", "target"):
            run = report["runs"][backend][mode]
            assert all(len(tokens) == 6 for tokens in run["tokens"].values())  # parity is over real tokens
            assert all(v["identical"] for v in run["parity_vs_ort_cpu"].values())
    # 2 modes per backend: ort-cpu ran on onnxruntime only; both TensorRT variants on TensorRTBackend
    ort, device_kv, host_kv = runs[0:2], runs[2:4], runs[4:6]
    assert all(r["kinds"] == {"OnnxRuntimeBackend"} and r["trt_calls"] == 0 for r in ort)
    assert all(r["kinds"] == {"TensorRTBackend"} and r["trt_calls"] >= 6 * len(bench.PROMPTS) for r in device_kv + host_kv)
    assert [r["device_kv"] for r in device_kv + host_kv] == [True, True, False, False]
    for d, h in zip(device_kv, host_kv):  # the host-kv variant really copies the cache back every call
        assert h["to_host"] > 5 * d["to_host"]
    assert "ort-cuda" in report["skipped"] or "ort-cuda" in report["runs"]
    assert not any(onnx_export[0].glob("*.engine"))  # built in a copy
    # the parity field reports where tokens diverge
    assert bench.parity([1, 2, 3], [1, 2, 4]) == {"identical": False, "first_divergence": 2}
    assert bench.parity([1, 2, 3], [1, 2]) == {"identical": False, "first_divergence": 2}


# -- onnxruntime GPU providers ------------------------------------------------------------------
def test_onnxruntime_gpu_provider_not_installed(onnx_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendError, match=r"\['CUDAExecutionProvider'\] are not available.*onnxruntime-gpu"):
        Runtime.load(onnx_export[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_onnxruntime_silent_cpu_fallback_is_refused(onnx_export, monkeypatch):
    """What onnxruntime-gpu does without CUDA libraries: it lists the CUDA provider, creates the
    session on the CPU and only warns. Simulated by listing CUDA on the CPU build, which then
    falls back the same way."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    with pytest.raises(BackendError, match=r"asked for \['CUDAExecutionProvider'\] but fell back to "
                                           r"\['CPUExecutionProvider'\].*CUDA / cuDNN"):
        Runtime.load(onnx_export[0], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_check_providers():
    check = OnnxRuntimeBackend.check_providers
    check(["CPUExecutionProvider"], ["CPUExecutionProvider"])
    check(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="TensorrtExecutionProvider"):
        check(["TensorrtExecutionProvider", "CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_sampling_reads_topk_logits_from_the_device(engines, fake_gpu):
    """The heads' top-k logits stay on the GPU like the KV; sampling copies them back when it needs them."""
    rt = Runtime.load(engines, providers="tensorrt")
    greedy = rt.generate(PROMPT, 8, thresholds="never")
    assert rt.generate(PROMPT, 8, thresholds="never", temperature=1.0, top_k=1).tokens == greedy.tokens
    ref = Runtime.load(engines)  # onnxruntime on the same graphs
    opts = dict(thresholds="never", temperature=1.0, top_p=0.9, seed=4)
    assert rt.generate(PROMPT, 8, **opts).tokens == ref.generate(PROMPT, 8, **opts).tokens


def test_runtime_stays_torch_free_with_tensorrt_module():
    code = ("import sys, runtime, runtime.tensorrt, exporter.tensorrt_build; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- on a GPU ----------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not tb.TensorRTBackend.available(),
                         reason=f"needs TensorRT and a CUDA GPU: {tb.TensorRTBackend.unavailable_reason()}")


@pytest.fixture(scope="module")
def real_engines(onnx_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real") / "export"
    shutil.copytree(onnx_export[0], folder)
    tb.build_engines_on_device(folder, workspace_gb=1.0, limits={"batch": 1, "sequence": 128})
    return folder


@pytest.mark.gpu
@gpu
def test_gpu_tensorrt_tokens_match_onnxruntime_cpu(real_engines):
    ref = Runtime.load(real_engines)
    rt = Runtime.load(real_engines, providers="tensorrt")
    for thresholds in ("never", MIXED):
        a = ref.generate(PROMPT, 24, thresholds=thresholds)
        b = rt.generate(PROMPT, 24, thresholds=thresholds)
        assert b.tokens == a.tokens
        assert [r.segment for r in b.records] == [r.segment for r in a.records]


@pytest.mark.gpu
@gpu
def test_gpu_tensorrt_generation(real_engines, capsys):
    """64 tokens on real engines: every segment runs on TensorRTBackend with the KV cache left
    on the GPU, the tokens are onnxruntime-CPU's, and exact mode (which cuts the cache on the
    device) gives the full model's greedy tokens. The speed is printed, not asserted."""
    ref = Runtime.load(real_engines)
    rt = Runtime.load(real_engines, providers="tensorrt")
    assert all(isinstance(b, tb.TensorRTBackend) for b in rt.backends)
    rt.generate(PROMPT, 4)  # warm up
    t0 = time.perf_counter()
    r = rt.generate(PROMPT, 64, thresholds="never", stop_at_eos=False)
    seconds = time.perf_counter() - t0
    assert r.tokens == ref.generate(PROMPT, 64, thresholds="never", stop_at_eos=False).tokens
    cache = rt.kept.cache
    assert all(isinstance(a, tb.DeviceArray) for st in cache.segments for a in st.keys + st.values)
    exact = rt.generate(PROMPT, 32, thresholds=MIXED, exact=True, stop_at_eos=False)
    assert exact.tokens == r.tokens[:32]
    with capsys.disabled():
        print(f"\nTensorRT full chain: {r.tokens_per_second:.1f} tokens/s ({seconds:.2f} s for 64 tokens); "
              f"exact mode with {sum(x.rollbacks for x in exact.records)} rollbacks")
