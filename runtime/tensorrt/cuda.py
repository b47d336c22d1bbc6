"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no
cupy), with errors raised instead of returned as status codes."""

from __future__ import annotations

import numpy as np


class Cuda:
    """cuda-python's runtime module (`cudart`) behind methods that raise on failure."""

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

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """`height` rows of `width` bytes from device memory to device memory (cudaMemcpy2D:
        rows `src_pitch` bytes apart in the source, `dst_pitch` in the destination). On the
        legacy default stream, which the backend's (blocking) streams are ordered with: the
        copy follows the run that wrote the source and precedes the run that reads the copy."""
        if width and height:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            self._check(self.rt.cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, height, kind), "copy on device")
