"""How the exporter writes an ONNX graph: whole, or with its weights in a side file.

protobuf cannot serialize a message over 2 GB, so a graph above EXTERNAL_DATA_BYTES keeps its
initializers in `<graph>.data` beside it, which the manifest lists with its size and sha256
(`DataFile`). One rule for every graph the exporter writes: traced (`onnx_export.export_graph`)
and rewritten with quantized weights (`quantize.quantize_graph`).
"""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA_BYTES = 1 << 30  # graphs above this keep their weights in a side file


def needs_external_data(model) -> bool:
    """Whether `model` (an onnx.ModelProto) is too large to be written as one file."""
    return model.ByteSize() > EXTERNAL_DATA_BYTES


def save_graph(model, path: Path) -> None:
    """Write `model` to `path`, its weights in `path.name + ".data"` when it is too large."""
    import onnx

    big = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)
