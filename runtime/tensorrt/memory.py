"""GPU memory for the TensorRT backend: owned buffers, a pool that recycles them, and
`DeviceArray`, a tensor left on the GPU (the present KV of one step is the next step's past,
without a round trip through host memory)."""

from __future__ import annotations

import weakref

import numpy as np

from .cuda import Cuda

_ALIGN = 256  # smallest device allocation (also keeps empty tensors on a valid address)


def _free(cuda: Cuda, ptr: int) -> None:
    try:
        cuda.free(ptr)
    except Exception:  # at interpreter exit the CUDA context may already be gone
        pass


def capacity(nbytes: int) -> int:
    """Power-of-two sizes: a KV cache growing by one position per token reuses its buffers."""
    return max(_ALIGN, 1 << max(nbytes - 1, 0).bit_length())


class DeviceBuffer:
    """Owned device allocation, freed by close() or when garbage collected."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, nbytes
        self.ptr = cuda.malloc(nbytes)
        self._finalizer = weakref.finalize(self, _free, cuda, self.ptr)

    def close(self) -> None:
        self.ptr = 0
        self._finalizer()


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
        return DeviceBuffer(self.cuda, capacity(nbytes))

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
        self.pool = pool
        weakref.finalize(self, pool.release, buffer)

    def narrow(self, axis: int, length: int) -> "DeviceArray":
        """The first `length` entries along `axis` as a new (contiguous, as engines read it)
        array, copied on the device: how the KV cache is cut (`KVCache.truncate`) without a
        round trip through host memory. The array itself is left as it is."""
        if not 0 <= axis < self.ndim or not 0 <= length <= self.shape[axis]:
            raise ValueError(f"cannot narrow {self!r} to {length} entries along axis {axis}")
        if length == self.shape[axis]:
            return self
        shape = self.shape[:axis] + (length,) + self.shape[axis + 1:]
        row = int(np.prod(self.shape[axis + 1:], dtype=np.int64)) * self.dtype.itemsize  # bytes per entry
        rows = int(np.prod(self.shape[:axis], dtype=np.int64))
        out = DeviceArray(self.pool.acquire(max(rows * length * row, 1)), shape, self.dtype, self.pool)
        self.buffer.cuda.copy_2d(out.ptr, length * row, self.ptr, self.shape[axis] * row, length * row, rows)
        return out

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
