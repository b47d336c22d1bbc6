"""Gemma 3 through the quantized export the main job uses for it (scripts/main.sh gemma3-270m:
int8 with the GGUF's Q8_0 blocks kept exactly; its sliding-window attention takes the concat KV
layout by itself), on a tiny random Gemma 3 (sliding | full layers, window shorter than the
prompt, soft-capped logits) whose LM head / embedding and attention projections hold Q8_0
blocks (the real gemma-3-270m-q4_k_m.gguf has Q8_0 in its embedding and half its v projections)
and whose other weights are plain floats that the export rounds to 8 bits.

Not covered, known: a packed q|k|v weight holds Q8_0 blocks only where q, k and v all do, while
the PyTorch twin checks each projection alone; and weights on a coarser grid (Q5_0's 16 levels)
can sit on rounding ties of the 8-bit grid. Either makes the twin differ from the graphs (on
this tiny model, ~0.03-0.08 in the logits), which is why this test uses neither."""

import numpy as np
import pytest
import torch
from conftest import WINDOW, make_checkpoint

from exporter import api
from exporter.checkpoint import Checkpoint
from exporter.gguf_blocks import q8_0_blocks
from exporter.quant_calibrate import quantized_backbone
from exporter.quantize import Scheme
from runtime import Runtime
from runtime.manifest import Manifest

PROMPT = "It is a truth universally acknowledged, that a single man"  # longer than the window


def _blocks(w: torch.Tensor, levels: int) -> torch.Tensor:
    """w (N, K) rounded per block of 32 inputs to integer multiples of max|w| / levels."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    d = (b.abs().amax(-1, keepdim=True) / levels).clamp_min(1e-12)  # zero rows (the padding embedding) stay 0
    return (torch.round(b / d) * d).reshape(n, k)


@pytest.fixture(scope="module")
def gemma_int8(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3-int8")
    ckpt, bb = make_checkpoint(d, "gemma3_text", exits=(1, 2), gate_width=8, layers=4)
    with torch.no_grad():
        for name, m in bb.model.named_modules():
            if isinstance(m, torch.nn.Linear):
                if name.endswith(("q_proj", "k_proj", "v_proj", "lm_head")):  # the LM head is the tied embedding
                    m.weight.copy_(_blocks(m.weight, 127))
    folder = api.export(ckpt, out=d / "int8", precision="int8", with_logits=True, backbone=bb,
                        quant_options={"exact_blocks": True})
    return ckpt, bb, folder


def test_sliding_windows_take_the_concat_layout(gemma_int8):
    _, bb, folder = gemma_int8
    assert bb.model.config.sliding_window == WINDOW
    assert Manifest.load(folder).kv_cache.layout == "concat"


def test_q8_0_blocks_are_kept_and_the_rest_is_8_bit(gemma_int8):
    _, bb, folder = gemma_int8
    q = Manifest.load(folder).quantization
    assert q.bits == 8 and q.accuracy_level == 4
    assert q8_0_blocks(bb.model.lm_head.weight.detach().numpy().T) is not None
    # the LM head in the last segment and in the exit head graph, packed q|k|v in every layer
    assert {k: v for k, v in q.exact_blocks.items() if v} == {"q8_0": 2 + bb.shape.num_layers}
    assert not q.float_matmuls


def test_int8_chain_gives_its_pytorch_twins_logits(gemma_int8):
    """The graphs compute what the export calibrated on: the fake-quantized PyTorch model (int8
    activation blocks at accuracy level 4), past the sliding window."""
    ckpt, bb, folder = gemma_int8
    rt = Runtime.load(folder)
    ids = rt.encode(PROMPT)
    assert len(ids) > 2 * WINDOW
    _, _, _, logits = rt.step(ids, rt.new_cache(), rt.resolve_thresholds("never"), want_logits=True)
    qbb, _, _, _ = quantized_backbone(bb, Checkpoint.open(ckpt), Scheme.for_precision("int8", exact_blocks=True))
    with torch.no_grad():
        fake = qbb.model(torch.from_numpy(ids)[None]).logits[0, -1].numpy()
        fp32 = bb.model(torch.from_numpy(ids)[None]).logits[0, -1].numpy()
    assert np.abs(fake - logits[0]).max() < 2e-3, np.abs(fake - logits[0]).max()
    assert np.abs(fp32 - logits[0]).max() > 5 * np.abs(fake - logits[0]).max()  # quantization shows


def test_int8_chain_decodes_greedily_with_exits_off(gemma_int8):
    _, _, folder = gemma_int8
    rt = Runtime.load(folder)
    a = rt.generate(PROMPT, 12, thresholds="never", stop_at_eos=False)
    b = rt.generate(PROMPT, 12, thresholds="never", stop_at_eos=False, exact=True)
    assert len(a.tokens) == 12 and list(a.tokens) == list(b.tokens)
