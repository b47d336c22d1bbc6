"""`TensorRTBackend`: one deserialized engine and its execution context, run like the
onnxruntime backend (`run(feeds) -> {name: array}`). Outputs come back as numpy arrays;
outputs named in ``device_outputs`` (the present KV) come back as `DeviceArray`s instead,
which the next call accepts as inputs (the past KV) without a round trip through host memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..manifest import GraphSpec, ManifestError, SegmentSpec
from ..verify import sha256
from . import versions
from .memory import DeviceArray, DeviceBuffer, DevicePool, capacity
from .profiles import label
from .versions import REBUILD, check_engine_compatible


class TensorRTBackend:
    """One deserialized engine and its execution context: `run(feeds) -> {name: array}`."""

    name = "tensorrt"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            versions.load_tensorrt()
        except RuntimeError as e:
            return str(e)
        return None

    @staticmethod
    def available() -> bool:
        return TensorRTBackend.unavailable_reason() is None

    def __init__(self, folder: str | Path, seg: SegmentSpec | GraphSpec, device_outputs=()):
        folder = Path(folder)
        self.label = label(seg)
        where = f"{folder}: {self.label}"
        if getattr(seg, "engine", None) is None:
            raise ManifestError(f"{where} has no TensorRT engine in the manifest; build them on this device with "
                                f"`{REBUILD.format(folder=folder)}`")
        try:
            trt, self.cuda = versions.load_tensorrt()
        except RuntimeError as e:
            raise BackendError(f"running TensorRT engines needs an NVIDIA GPU, the tensorrt package and cuda-python "
                                f"({e}); the same export runs on onnxruntime: leave providers unset") from None
        check_engine_compatible(seg.engine, trt.__version__, self.cuda.compute_capability(), where, folder)
        path = folder / seg.engine["file"]
        if not path.is_file():
            raise ManifestError(f"{where}: engine file {path.name} is missing; rebuild with "
                                f"`{REBUILD.format(folder=folder)}`")
        if seg.engine.get("sha256") and sha256(path) != seg.engine["sha256"]:
            raise ManifestError(f"{where}: engine file {path.name} does not match its sha256 in the manifest; "
                                f"rebuild with `{REBUILD.format(folder=folder)}`")
        self.runtime = trt.Runtime(versions.logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{where}: TensorRT could not deserialize {path.name} (see its log); engines are not "
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
            buf = table[name] = DeviceBuffer(self.cuda, capacity(nbytes))
        return buf

    def _check_shape(self, name: str, shape: tuple) -> None:
        lo, _, hi = self.profile[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise ValueError(f"{self.label} input {name} has shape {tuple(shape)}, outside the engine's "
                             f"profile (min {tuple(lo)}, max {tuple(hi)}); rebuild the engines with larger limits "
                             f"({REBUILD.format(folder='DIR')} --max-sequence N --max-batch N)")

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
