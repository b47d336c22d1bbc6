"""Is TensorRT usable here, and does an engine fit this device?

The imports are functions so that the tests (which have no GPU) can patch them with fakes.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendError
from .cuda import Cuda

REBUILD = "python -m runtime.tensorrt {folder}"
MIN_TENSORRT = 10  # int64 I/O tensors, name-based tensor API, execute_async_v3


def import_tensorrt():
    import tensorrt

    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


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


def logger(trt):
    """One logger per process, as TensorRT expects."""
    return _LOGGERS.setdefault(id(trt), trt.Logger(trt.Logger.WARNING))


def check_engine_compatible(engine: dict, tensorrt_version: str, compute_capability: str,
                            where: str = "engine", folder: str | Path = "EXPORT_DIR") -> None:
    """Raise BackendError unless `engine` (a SegmentSpec.engine) was built by this TensorRT
    version for this GPU architecture: deserializing a foreign engine fails or misbehaves."""
    built_v, built_cc = str(engine.get("tensorrt_version")), str(engine.get("compute_capability"))
    problems = []
    if built_v != str(tensorrt_version):
        problems.append(f"built with TensorRT {built_v}, this device has TensorRT {tensorrt_version}")
    if built_cc != str(compute_capability):
        problems.append(f"built for compute capability {built_cc}, this GPU is {compute_capability}")
    if problems:
        raise BackendError(
            f"{where}: {'; '.join(problems)}. TensorRT engines are not portable across TensorRT versions or GPU "
            f"architectures: rebuild them on this device from the ONNX graphs in the same folder with "
            f"`{REBUILD.format(folder=folder)}`, or run the ONNX graphs with onnxruntime (leave providers unset)")
