"""TracerWarnings are the signal that a value or shape was baked into a traced graph: the
export lets them through (issue 26, item 7), and the family exports here turn them into errors."""

import pytest
import torch
from conftest import make_checkpoint

from exporter import api
from exporter.onnx_export import export_graph
from runtime.manifest import TensorSpec


class Baked(torch.nn.Module):
    """A Python branch on a tensor's value: tracing freezes it to the dummy input's branch."""

    def forward(self, hidden):
        return hidden * 2 if hidden.sum() > 0 else hidden


def test_a_tracer_warning_is_not_muted(tmp_path):
    inputs = [TensorSpec("hidden", "hidden", "float32", ("batch", "sequence", 4))]
    outputs = [TensorSpec("hidden_out", "hidden_out", "float32", ("batch", "sequence", 4))]
    with pytest.warns(torch.jit.TracerWarning, match="Python boolean"):
        export_graph(Baked(), inputs, outputs, tmp_path / "baked.onnx", "fp32", 97)


@pytest.mark.filterwarnings("error::torch.jit.TracerWarning")
@pytest.mark.parametrize("family, options", [
    ("llama", {"gates": True}),  # concat KV, gated segments and the head graph
    ("qwen3", {}),  # KV buffer (GroupQueryAttention)
])
def test_family_exports_trace_without_tracer_warnings(tmp_path, family, options):
    ckpt, bb = make_checkpoint(tmp_path, family, **options)
    out = api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    assert (out / "manifest.json").is_file()
