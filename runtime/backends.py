"""Backends run one segment graph: feeds by name in, outputs by name out.

A backend is anything with `run(feeds) -> dict` and `input_names`; `open_backend` picks
one from the `providers=` argument. Each backend class can be asked whether it is usable
here (`available()`), so the runtime and the tests can say why a path is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .manifest import ManifestError, SegmentSpec


class Backend(Protocol):
    input_names: set[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeBackend:
    """onnxruntime InferenceSession with settings that suit a chain of small graphs."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Spinning threads of N sessions fight for the same cores: a chain of 8 segments ran
        # 5x slower with the default (../shared/KNOWN.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise ManifestError(f"onnxruntime providers {unknown} are not available here "
                                f"(available: {ort.get_available_providers()})")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ManifestError(f"{path.name}: onnxruntime cannot load this graph ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]})") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

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


def open_backend(folder: Path, seg: SegmentSpec, providers: list[str] | str | None = None,
                 threads: int | None = None) -> Backend:
    if providers == "tensorrt" or providers == ["tensorrt"]:
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(folder, seg)
    if isinstance(providers, str):
        providers = [providers]
    return OnnxRuntimeBackend(folder / seg.file, providers, threads)
