"""`lama export --no-exits`: the plain model as one graph (the baseline a chain is measured against)."""

import pytest
from conftest import decode_against_pytorch, make_checkpoint

from exporter import api
from runtime import Runtime
from runtime.manifest import Manifest


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    ckpt, bb = make_checkpoint(d, "llama_hd16")
    return ckpt, bb, api.export(ckpt, out=d / "plain", with_logits=True, kv="buffer", kv_capacity=256, backbone=bb,
                                exits=False)


def test_one_segment_no_exits(plain):
    ckpt, bb, folder = plain
    m = Manifest.load(folder)
    assert len(m.segments) == 1 and m.segments[0].layers == (0, bb.shape.num_layers)
    assert m.exits == []
    assert m.segments[0].exit is None and not m.heads
    assert m.calibration.thresholds == () and m.calibration.by_target == {}
    assert not any(p.name.startswith(("head", "kv_fill")) for p in folder.iterdir())


def test_plain_graph_matches_pytorch_and_decodes_exactly(plain):
    """Every step's logits equal a full forward pass; exact decoding with prompt-lookup drafts gives
    the same tokens as plain greedy decoding (drafts are proposed: with random weights few pass)."""
    _, bb, folder = plain
    rt = Runtime.load(folder)
    worst, _, _ = decode_against_pytorch(rt, bb, "It is a truth", 8)
    assert worst <= 1e-4
    prompt = "It is a truth universally acknowledged. It is a truth universally acknowledged. It is a truth"
    greedy = rt.generate(prompt, max_new_tokens=16)
    exact = rt.generate(prompt, max_new_tokens=16, exact=True)
    assert exact.tokens == greedy.tokens
    lookup = exact.drafts()["sources"]["lookup"]
    assert lookup["drafted"] > 0


def test_int4_plain_export_records_why_nothing_was_calibrated(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "llama_hd16")
    folder = api.export(ckpt, out=tmp_path / "q", precision="int4", kv="buffer", kv_capacity=64, backbone=bb,
                        exits=False)
    m = Manifest.load(folder)
    assert m.quantization.calibration["scores"].startswith("none: an export without exits")
    assert len(m.segments) == 1 and m.calibration.thresholds == ()
    rt = Runtime.load(folder)
    assert len(rt.generate("It is a truth", max_new_tokens=4).tokens) == 4
