"""`lama export --backend tensorrt`: the exporter's side of TensorRT engine building.

The build itself lives in runtime/tensorrt/, because engines are not portable (one TensorRT
version, one GPU architecture) and so must also be buildable on the device, where only the
runtime is installed; the runtime never imports the exporter, so the exporter reuses the
runtime's implementation. This module adds the early check (fail before the slow export
when no engine could be built here) and the exporter-facing names. On a device::

    python -m runtime.tensorrt EXPORT_DIR      # or: python -m exporter.tensorrt_build EXPORT_DIR
"""

from __future__ import annotations

from pathlib import Path

from runtime import tensorrt
from runtime.manifest import Manifest

NEEDS = ("building TensorRT engines needs an NVIDIA GPU and the tensorrt package; "
         "the ONNX export works without them: use --backend onnx")


def check_can_build() -> None:
    """RuntimeError with a clear message unless TensorRT, cuda-python and a GPU are all here."""
    try:
        tensorrt.load_tensorrt()
    except RuntimeError as e:
        raise RuntimeError(f"{NEEDS} ({e})") from None


def build_engines(folder: str | Path, manifest: Manifest, workspace_gb: float = 2.0,
                  limits: dict | None = None) -> Manifest:
    """One engine per segment graph in `folder`; returns the manifest with `engine` filled in."""
    return tensorrt.build_engines(folder, manifest, workspace_gb=workspace_gb, limits=limits)


def main(argv: list[str] | None = None) -> int:
    return tensorrt.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
