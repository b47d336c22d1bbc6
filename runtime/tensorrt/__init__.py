"""Native TensorRT engines for the segment chain: build them on the device, then run them.

Why a separate backend: onnxruntime's TensorRT provider rebuilds or caches engines behind
the scenes, while an edge device wants one prebuilt engine per segment, loaded in
milliseconds, and the KV cache left in GPU memory between tokens.

Engines are *not portable*: a serialized engine only loads under the TensorRT version that
built it, on a GPU of the same compute capability. So the build lives here, on the runtime
side (the ONNX parser needs no torch), and the export folder keeps its ONNX graphs: any
device with a GPU can rebuild its own engines from them::

    python -m runtime.tensorrt runs/smollm2-onnx [--max-sequence 512 --max-batch 1]

and then ``Runtime.load(folder, providers="tensorrt")``. The manifest records, per segment,
the engine's file, sha256, size, TensorRT version, compute capability and profile; loading
checks them and says how to rebuild when they do not match this device.

One module per concern:

| module | what |
|---|---|
| `versions` | importing tensorrt / cuda-python, the minimum version, does an engine fit this device |
| `cuda` | the few CUDA runtime calls (cuda-python: no torch, no cupy), errors raised |
| `profiles` | optimization profiles: named dims -> min/opt/max shapes per graph input |
| `build` | building engines (and `python -m runtime.tensorrt`, its command line) |
| `memory` | device buffers, the buffer pool, `DeviceArray` (a tensor left on the GPU) |
| `backend` | `TensorRTBackend`: one engine, `run(feeds) -> {name: array}` |
"""

from .backend import TensorRTBackend
from .build import build_engine, build_engines, build_engines_on_device, main
from .cuda import Cuda
from .memory import DeviceArray, DeviceBuffer, DevicePool
from .profiles import input_profiles, profile_dims
from .versions import MIN_TENSORRT, REBUILD, check_engine_compatible, load_tensorrt

__all__ = ["MIN_TENSORRT", "REBUILD", "Cuda", "DeviceArray", "DeviceBuffer", "DevicePool", "TensorRTBackend",
           "build_engine", "build_engines", "build_engines_on_device", "check_engine_compatible", "input_profiles",
           "load_tensorrt", "main", "profile_dims"]
