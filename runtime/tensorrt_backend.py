"""Native TensorRT engines for the segment chain: build them on the device, then run them.

Why a separate backend: onnxruntime's TensorRT provider rebuilds or caches engines behind
the scenes, while an edge device wants one prebuilt engine per segment, loaded in
milliseconds, and the KV cache left in GPU memory between tokens.

Engines are *not portable*: a serialized engine only loads under the TensorRT version that
built it, on a GPU of the same compute capability. So the build lives here, on the runtime
side (the ONNX parser needs no torch), and the export folder keeps its ONNX graphs: any
device with a GPU can rebuild its own engines from them::

    python -m runtime.tensorrt_backend runs/smollm2-onnx [--max-sequence 512 --max-batch 1]

and then ``Runtime.load(folder, providers="tensorrt")``. The manifest records, per segment,
the engine's file, sha256, size, TensorRT version, compute capability and profile; loading
checks them and says how to rebuild when they do not match this device.

Device memory comes from cuda-python (``cuda.bindings.runtime``: no torch, no cupy), behind
an import guard like tensorrt itself. Outputs come back as numpy arrays; outputs named in
``device_outputs`` (the present KV) come back as `DeviceArray`s instead, which the next call
accepts as inputs (the past KV) without a round trip through host memory.
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np

from .manifest import Manifest, ManifestError, SegmentSpec
from .verify import sha256

REBUILD = "python -m runtime.tensorrt_backend {folder}"
MIN_TENSORRT = 10  # int64 I/O tensors, name-based tensor API, execute_async_v3
_ALIGN = 256  # smallest device allocation (also keeps empty tensors on a valid address)


# -- imports (patched by the tests, which have no GPU) -------------------------------------
def import_tensorrt():
    import tensorrt

    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


class Cuda:
    """The few CUDA runtime calls the backend needs, with errors raised instead of returned."""

    def __init__(self, cudart):
        self.rt = cudart
        self.ok = cudart.cudaError_t.cudaSuccess

    @staticmethod
    def _name(err) -> str:
        return getattr(err, "name", None) or str(err)

    def _check(self, result, what: str):
        result = result if isinstance(result, tuple) else (result,)
        if result[0] != self.ok:
            raise RuntimeError(f"CUDA {what} failed: {self._name(result[0])}")
        return result[1] if len(result) == 2 else None

    def device_count(self) -> tuple[int, str]:
        """(number of visible GPUs, why none when 0). No driver is an answer, not an error."""
        result = self.rt.cudaGetDeviceCount()
        if result[0] != self.ok:
            return 0, f"cudaGetDeviceCount: {self._name(result[0])}"
        return int(result[1] or 0), "cudaGetDeviceCount found no device"

    def compute_capability(self) -> str:
        dev = self._check(self.rt.cudaGetDevice(), "cudaGetDevice")
        attr = self.rt.cudaDeviceAttr
        major = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, dev), "attribute")
        minor = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, dev), "attribute")
        return f"{major}.{minor}"

    def device_name(self) -> str:
        try:
            dev = self._check(self.rt.cudaGetDevice(), "cudaGetDevice")
            name = self._check(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties").name
            return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        except Exception:  # informational only
            return ""

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def stream(self):
        return self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def sync(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def to_device(self, ptr: int, host: np.ndarray, stream) -> None:
        if host.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream), "copy to device")

    def to_host(self, host: np.ndarray, ptr: int, stream=None) -> None:
        if not host.nbytes:
            return
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stream is None:
            self._check(self.rt.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, kind), "copy to host")
        else:
            self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream), "copy to host")


def load_tensorrt():
    """(tensorrt module, Cuda) when TensorRT >= 10 and cuda-python import and a GPU is visible;
    otherwise RuntimeError naming what is missing."""
    try:
        trt = import_tensorrt()
    except (ImportError, OSError) as e:
        raise RuntimeError(f"the tensorrt package cannot be imported: {e}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT:
        raise RuntimeError(f"TensorRT {trt.__version__} is too old; {MIN_TENSORRT} or newer is needed")
    try:
        cuda = Cuda(import_cudart())
    except (ImportError, OSError) as e:
        raise RuntimeError(f"cuda-python cannot be imported ({e}); pip install cuda-python") from None
    n, why = cuda.device_count()
    if n == 0:
        raise RuntimeError(f"no CUDA GPU is visible ({why})")
    return trt, cuda


_LOGGERS: dict = {}


def _logger(trt):
    """One logger per process, as TensorRT expects."""
    return _LOGGERS.setdefault(id(trt), trt.Logger(trt.Logger.WARNING))


# -- compatibility ------------------------------------------------------------------------
def check_engine_compatible(engine: dict, tensorrt_version: str, compute_capability: str,
                            where: str = "engine", folder: str | Path = "EXPORT_DIR") -> None:
    """Raise ManifestError unless `engine` (a SegmentSpec.engine) was built by this TensorRT
    version for this GPU architecture: deserializing a foreign engine fails or misbehaves."""
    built_v, built_cc = str(engine.get("tensorrt_version")), str(engine.get("compute_capability"))
    problems = []
    if built_v != str(tensorrt_version):
        problems.append(f"built with TensorRT {built_v}, this device has TensorRT {tensorrt_version}")
    if built_cc != str(compute_capability):
        problems.append(f"built for compute capability {built_cc}, this GPU is {compute_capability}")
    if problems:
        raise ManifestError(
            f"{where}: {'; '.join(problems)}. TensorRT engines are not portable across TensorRT versions or GPU "
            f"architectures: rebuild them on this device from the ONNX graphs in the same folder with "
            f"`{REBUILD.format(folder=folder)}`, or run the ONNX graphs with onnxruntime (leave providers unset)")


# -- optimization profiles ----------------------------------------------------------------
def profile_dims(manifest: Manifest, limits: dict | None = None) -> dict[str, tuple[int, int, int]]:
    """Named dims -> (min, opt, max) from manifest.dims; a None max is the model's context.

    `limits` caps maxima ({"batch": 1, "sequence": 512}): TensorRT sizes activation memory for
    the largest shapes, and batch 8 x the full context can exceed an edge GPU's memory. When
    past or sequence is capped, total (= past + sequence) follows.
    """
    limits = {k: int(v) for k, v in (limits or {}).items() if v is not None}
    unknown = set(limits) - set(manifest.dims)
    if unknown:
        raise ValueError(f"unknown dims {sorted(unknown)}; the manifest has {sorted(manifest.dims)}")
    ctx = manifest.model.max_context
    out = {}
    for name, d in manifest.dims.items():
        lo = int(d.get("min", 1))
        hi = limits.get(name, ctx if d.get("max") is None else int(d["max"]))
        hi = max(hi, lo)
        out[name] = (lo, min(max(int(d.get("opt", lo)), lo), hi), hi)
    if {"past", "sequence", "total"} <= set(out):  # total = past + sequence: keep the three consistent
        (p0, po, p1), (s0, so, s1), (t0, _, t1) = out["past"], out["sequence"], out["total"]
        if "total" not in limits and ({"past", "sequence"} & set(limits)):
            t1 = max(t0, min(t1, p1 + s1))
        p1, s1 = max(p0, min(p1, t1 - s0)), max(s0, min(s1, t1 - p0))
        po, so = min(po, p1), min(so, s1)
        po = max(p0, min(po, t1 - so))
        out["past"], out["sequence"] = (p0, po, p1), (s0, so, s1)
        out["total"] = (t0, min(max(po + so, t0), t1), t1)  # the optimum is a real decode shape
    return out


def input_profiles(seg: SegmentSpec, dims: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Each input of the graph -> (min shape, opt shape, max shape)."""
    shapes = {}
    for t in seg.inputs:
        corners = ([], [], [])
        for d in t.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ManifestError(f"{_label(seg)} input {t.name}: dim {d!r} has no min/opt/max in the manifest")
                values = dims[d]
            else:
                values = (int(d),) * 3
            for corner, v in zip(corners, values):
                corner.append(v)
        shapes[t.name] = tuple(tuple(c) for c in corners)
    return shapes


# -- building -----------------------------------------------------------------------------
def build_engine(trt, onnx_path: Path, shapes: dict, fp16: bool, workspace_bytes: int) -> bytes:
    """Parse one segment graph and build a serialized engine with a single optimization profile."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT >= 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: finds external weight data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 removed it: networks are strongly typed,
        config.set_flag(trt.BuilderFlag.FP16)      # and an fp16 export's graph is fp16 already
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ManifestError(f"{onnx_path.name}: graph input {name!r} is not listed in the manifest")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    return bytes(serialized)


def _label(graph) -> str:
    """"segment 2" for segments, "graph head.onnx" for other graphs (gate-mode exit heads)."""
    index = getattr(graph, "index", None)
    return f"segment {index}" if index is not None else f"graph {graph.file}"


def build_engines(folder: str | Path, manifest: Manifest, workspace_gb: float = 2.0, limits: dict | None = None,
                  log=None) -> Manifest:
    """Build an engine beside each graph in `folder` (`segment_XX.engine`); return the manifest
    with each graph's `engine` filled in (the caller saves it)."""
    folder = Path(folder)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    heads = tuple(manifest.heads)
    trt, cuda = load_tensorrt()
    dims = profile_dims(manifest, limits)
    cc, device = cuda.compute_capability(), cuda.device_name()
    fp16 = manifest.precision == "fp16"

    def build(graph):
        shapes = input_profiles(graph, dims)
        t0 = time.perf_counter()
        data = build_engine(trt, folder / graph.file, shapes, fp16, int(workspace_gb * (1 << 30)))
        seconds = time.perf_counter() - t0
        path = folder / (Path(graph.file).stem + ".engine")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        engine = {"file": path.name, "sha256": sha256(path), "size": path.stat().st_size,
                  "tensorrt_version": str(trt.__version__), "compute_capability": cc, "device": device,
                  "build_seconds": round(seconds, 3), "fp16_flag": bool(fp16 and hasattr(trt.BuilderFlag, "FP16")),
                  "workspace_gb": workspace_gb,
                  "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()}}
        log(f"{_label(graph)}: engine built in {seconds:.1f} s ({engine['size'] / 1e6:.1f} MB)")
        return replace(graph, engine=engine)

    out = replace(manifest, segments=tuple(build(seg) for seg in manifest.segments))
    return replace(out, heads=tuple(build(h) for h in heads)) if heads else out


def build_engines_on_device(folder: str | Path, workspace_gb: float = 2.0, limits: dict | None = None,
                            log=None) -> Manifest:
    """Build engines for an export folder on this device and record them in its manifest.json."""
    from .verify import verify_files

    folder = Path(folder)
    manifest = Manifest.load(folder)
    verify_files(folder, manifest)
    manifest = build_engines(folder, manifest, workspace_gb, limits, log)
    manifest.save(folder)
    return manifest


# -- device memory ------------------------------------------------------------------------
def _free(cuda: Cuda, ptr: int) -> None:
    try:
        cuda.free(ptr)
    except Exception:  # at interpreter exit the CUDA context may already be gone
        pass


class DeviceBuffer:
    """Owned device allocation, freed by close() or when garbage collected."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, nbytes
        self.ptr = cuda.malloc(nbytes)
        self._finalizer = weakref.finalize(self, _free, cuda, self.ptr)

    def close(self) -> None:
        self.ptr = 0
        self._finalizer()


def _capacity(nbytes: int) -> int:
    """Power-of-two sizes: a KV cache growing by one position per token reuses its buffers."""
    return max(_ALIGN, 1 << max(nbytes - 1, 0).bit_length())


class DevicePool:
    """Recycles output buffers: present KV of step t is freed when step t+1 replaces it, and a
    cudaFree/cudaMalloc pair per layer per token would synchronize the device each time."""

    def __init__(self, cuda: Cuda, keep: int = 64):
        self.cuda, self.keep = cuda, keep
        self.free: list[DeviceBuffer] = []
        self.allocations = 0
        self.closed = False

    def acquire(self, nbytes: int) -> DeviceBuffer:
        fits = [b for b in self.free if b.nbytes >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: b.nbytes)
            self.free.remove(buf)
            return buf
        self.allocations += 1
        return DeviceBuffer(self.cuda, _capacity(nbytes))

    def release(self, buf: DeviceBuffer) -> None:
        if self.closed:
            buf.close()
            return
        self.free.append(buf)
        if len(self.free) > self.keep:
            smallest = min(self.free, key=lambda b: b.nbytes)
            self.free.remove(smallest)
            smallest.close()

    def close(self) -> None:
        self.closed = True
        for b in self.free:
            b.close()
        self.free.clear()


class DeviceArray:
    """A tensor left in GPU memory. `shape`/`dtype` like numpy (so the KV cache bookkeeping
    works unchanged), `numpy()` or `np.asarray(x)` copies it to the host. Its buffer returns
    to the pool when the array is garbage collected."""

    def __init__(self, buffer: DeviceBuffer, shape: tuple, dtype, pool: DevicePool):
        self.buffer, self.shape, self.dtype = buffer, tuple(int(d) for d in shape), np.dtype(dtype)
        weakref.finalize(self, pool.release, buffer)

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        self.buffer.cuda.to_host(host, self.ptr)
        return host

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"


# -- the backend --------------------------------------------------------------------------
class TensorRTBackend:
    """One deserialized engine and its execution context: `run(feeds) -> {name: array}`."""

    name = "tensorrt"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            load_tensorrt()
        except RuntimeError as e:
            return str(e)
        return None

    @staticmethod
    def available() -> bool:
        return TensorRTBackend.unavailable_reason() is None

    def __init__(self, folder: str | Path, seg: SegmentSpec, device_outputs=()):
        folder = Path(folder)
        self.label = _label(seg)
        where = f"{folder}: {self.label}"
        if getattr(seg, "engine", None) is None:
            raise ManifestError(f"{where} has no TensorRT engine in the manifest; build them on this device with "
                                f"`{REBUILD.format(folder=folder)}`")
        try:
            trt, self.cuda = load_tensorrt()
        except RuntimeError as e:
            raise ManifestError(f"running TensorRT engines needs an NVIDIA GPU, the tensorrt package and cuda-python "
                                f"({e}); the same export runs on onnxruntime: leave providers unset") from None
        check_engine_compatible(seg.engine, trt.__version__, self.cuda.compute_capability(), where, folder)
        path = folder / seg.engine["file"]
        if not path.is_file():
            raise ManifestError(f"{where}: engine file {path.name} is missing; rebuild with "
                                f"`{REBUILD.format(folder=folder)}`")
        if seg.engine.get("sha256") and sha256(path) != seg.engine["sha256"]:
            raise ManifestError(f"{where}: engine file {path.name} does not match its sha256 in the manifest; "
                                f"rebuild with `{REBUILD.format(folder=folder)}`")
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"{where}: TensorRT could not deserialize {path.name} (see its log); engines are not "
                                f"portable, rebuild with `{REBUILD.format(folder=folder)}`")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            kind = self.inputs if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else self.outputs
            kind[n] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
        self.input_names = set(self.inputs)
        self.output_names = list(self.outputs)
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self.device_outputs = set(device_outputs)  # e.g. the present_* names: keep the KV cache on the GPU
        self.stream = self.cuda.stream()
        self.pool = DevicePool(self.cuda, keep=max(16, 2 * len(self.outputs)))
        self._staging: dict[str, DeviceBuffer] = {}  # per input fed from host memory
        self._host_out: dict[str, DeviceBuffer] = {}  # per output copied back to host memory

    def _buffer(self, table: dict, name: str, nbytes: int) -> DeviceBuffer:
        buf = table.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.close()  # safe: every run() ends with the stream synchronized
            buf = table[name] = DeviceBuffer(self.cuda, _capacity(nbytes))
        return buf

    def _check_shape(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise ValueError(f"{self.label} input {name} has shape {tuple(shape)}, outside the engine's "
                             f"profile (min {tuple(lo)}, max {tuple(hi)}); rebuild the engines with larger limits "
                             f"(python -m runtime.tensorrt_backend DIR --max-sequence N --max-batch N)")

    def run(self, feeds: dict, device_outputs=None) -> dict:
        """Feeds by name (numpy arrays or DeviceArrays); extra names are ignored. Outputs named in
        `device_outputs` (default: self.device_outputs) stay on the GPU as DeviceArrays."""
        keep = self.device_outputs if device_outputs is None else set(device_outputs)
        hold = []  # host arrays must live until the copies finished
        for name, dtype in self.inputs.items():
            if name not in feeds:
                raise ValueError(f"{self.label}: input {name!r} is missing from the feeds")
            x = feeds[name]
            if isinstance(x, DeviceArray):
                if x.dtype != dtype:
                    raise ValueError(f"{self.label} input {name}: device array is {x.dtype}, engine wants {dtype}")
                ptr, shape = x.ptr, x.shape
                hold.append(x)
            else:
                arr = np.ascontiguousarray(x, dtype=dtype)
                buf = self._buffer(self._staging, name, arr.nbytes)
                self.cuda.to_device(buf.ptr, arr, self.stream)
                ptr, shape = buf.ptr, arr.shape
                hold.append(arr)
            self._check_shape(name, shape)
            if not self.context.set_input_shape(name, tuple(shape)):
                raise ValueError(f"{self.label}: TensorRT rejected shape {tuple(shape)} for input {name}")
            self.context.set_tensor_address(name, ptr)
        results, copies = {}, []
        for name, dtype in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.label}: output {name} has unresolved shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if name in keep:
                buf = self.pool.acquire(nbytes)
                results[name] = DeviceArray(buf, shape, dtype, self.pool)
            else:
                buf = self._buffer(self._host_out, name, nbytes)
                results[name] = np.empty(shape, dtype)
                copies.append((results[name], buf))
            self.context.set_tensor_address(name, buf.ptr)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.label}: TensorRT execution failed (see its log)")
        for host, buf in copies:
            self.cuda.to_host(host, buf.ptr, self.stream)
        self.cuda.sync(self.stream)
        return results

    def close(self) -> None:
        for table in (self._staging, self._host_out):
            for b in table.values():
                b.close()
            table.clear()
        self.pool.close()


# -- command line -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tensorrt_backend",
                                description="Build TensorRT engines for an export folder on this device (engines "
                                            "are not portable: build them where they run).")
    p.add_argument("folder", type=Path, help="a `lama export` folder (its ONNX graphs and manifest.json)")
    p.add_argument("--workspace-gb", type=float, default=2.0, help="builder workspace limit")
    p.add_argument("--max-batch", type=int, help="largest batch the engines accept (default: the manifest's)")
    p.add_argument("--max-sequence", type=int, help="longest prompt chunk per call (default: the model's context)")
    p.add_argument("--max-past", type=int, help="longest cached past (default: the model's context)")
    a = p.parse_args(argv)
    limits = {"batch": a.max_batch, "sequence": a.max_sequence, "past": a.max_past}
    try:
        load_tensorrt()
    except RuntimeError as e:
        print(f"error: this device cannot build TensorRT engines: {e}", file=sys.stderr)
        return 2
    try:
        manifest = build_engines_on_device(a.folder, a.workspace_gb, limits)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(s.engine["build_seconds"] for s in manifest.segments)
    print(f"built {len(manifest.segments)} engines in {total:.1f} s into {a.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
