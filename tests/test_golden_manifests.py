"""The runtime's compatibility promise, tested: a manifest of every supported schema version
(tests/data/manifests/schemaN/manifest.json, docs/manifest.md is the spec) loads with the
runtime's own loader and reads as the same facts.

The goldens are checked in and never regenerated: they are what an exporter of that version
wrote (tiny Llama-shaped model; graph files absent, so this tests the parsing and validation
layer, `Manifest.load`, not `Runtime.load`'s file checks). A new schema version adds a golden
here, and the test below that lists them fails until it does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.manifest import FORMAT, SCHEMA_VERSION, SUPPORTED_VERSIONS, DataFile, Manifest, ManifestError

GOLDEN = Path(__file__).parent / "data" / "manifests"


def golden(version: int) -> Manifest:
    return Manifest.load(GOLDEN / f"schema{version}")


def test_every_supported_version_has_a_golden():
    found = sorted(int(d.name.removeprefix("schema")) for d in GOLDEN.glob("schema*") if d.is_dir())
    assert found == sorted(SUPPORTED_VERSIONS) and SCHEMA_VERSION == max(found)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_golden_loads_with_its_version_and_model(version):
    m = golden(version)
    assert m.format == FORMAT and m.schema_version == version
    assert (m.model.num_layers, m.model.hidden_size, m.model.num_kv_heads, m.model.head_dim) == (4, 64, 2, 16)
    assert m.model.family == "llama" and m.model.vocab_size == 97 and m.exporter_version == "0.1.0"
    # the roles the runtime feeds and reads, whatever the version
    first, last = m.segments[0], m.segments[-1]
    assert first.entry_role == "input_ids" and all(s.entry_role == "hidden" for s in m.segments[1:])
    assert [t.layer for t in first.per_layer(first.inputs, "past_key")] == list(range(*first.layers))
    assert last.exit is None and "token" in last.names and all(s.exit for s in m.segments[:-1])
    assert len(m.calibration.thresholds) == len(m.exits)


def test_schema1_reads_with_the_defaults_later_versions_made_explicit():
    m = golden(1)
    assert m.kv_cache.layout == "concat" and m.kv_cache.capacity is None  # no kv_cache key: concat
    assert m.heads == () and m.quantization is None and m.precision == "fp32"
    assert m.tokenizer.files == (DataFile("tokenizer.json", None, None), DataFile("tokenizer_config.json", None, None))
    assert m.tokenizer.chat_template is None and m.calibration.by_target_delta is None
    assert m.calibration.thresholds == (0.8125,) and m.thresholds_for(0.99) == [None]
    assert [e.confidence for e in m.exits] == ["top1"] and m.segments[0].kv_fill is None
    assert "topk_values" not in m.segments[-1].names  # no sampling outputs yet: greedy only


def test_schema2_buffer_layout_gate_mode_and_fill_graphs():
    m = golden(2)
    assert (m.kv_cache.layout, m.kv_cache.capacity) == ("buffer", 256)
    assert {"seqlens_k", "total_sequence_length"} <= set(m.segments[0].names)
    assert m.calibration.confidence == "gate" and [e.head for e in m.exits] == [0, 0]
    assert m.heads[0].file == "head.onnx" and m.heads[0].output("topk_values").shape == ("batch", 64)
    assert m.calibration.thresholds == (None, 0.59375)  # the exits' own copies are ignored (schema < 3)
    assert m.calibration.by_target_delta == 0.1 and m.thresholds_for(0.8) == [0.9375, 0.40625]
    fill = m.segments[1].kv_fill
    assert fill.file == "kv_fill_01.onnx" and [t.layer for t in fill.per_layer(fill.outputs, "fill_key")] == [1, 2, 3]
    assert m.segments[0].data_files[0].file == "segment_00.onnx.data"
    assert all(f.sha256 is None for f in m.tokenizer.files) and m.tokenizer.chat_template == "chat_template.jinja"
    assert m.tokenizer.eos_ids == (2, 96) and m.dims["decode_sequence"]["max"] == 9


def test_schema3_one_copy_of_each_fact_checksummed_tokenizer_and_quantization():
    m = golden(3)
    raw = json.loads((GOLDEN / "schema3" / "manifest.json").read_text())
    assert "kv_layout" not in raw and all("threshold" not in (s["exit"] or {}) for s in raw["segments"])
    assert all(len(f.sha256) == 64 and f.size > 0 for f in m.tokenizer.files)
    assert m.precision == "int4" and m.quantization.bits == 4 and m.quantization.block_size == 32
    assert not any(m.quantization.exact_blocks.values()) and m.quantization.graphs[0] == "segment_00.onnx"
    assert m.calibration.policy["kind"] == "budget" and m.calibration.policy["kv_policy"] == "fill"
    assert m.segments[-1].engine["tensorrt_version"] == "10.13.0"
    assert Manifest.from_dict(json.loads(m.to_json())) == m  # what the exporter writes reads back the same


def test_the_golden_policy_is_the_one_runtime_policy_reads():
    from runtime.policy import Policy

    p = Policy.from_dict(golden(3).calibration.policy)
    assert (p.kind, p.budget, p.margin, p.kv_policy) == ("budget", 0.8, 0.03, "fill")


def test_a_newer_version_is_refused_naming_both():
    raw = json.loads((GOLDEN / "schema3" / "manifest.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ManifestError, match=rf"schema version {SCHEMA_VERSION + 1} is not supported.*"
                                            rf"supported: \[1, 2, 3\]"):
        Manifest.from_dict(raw)


def test_what_schema3_demands_is_not_asked_of_older_versions():
    """Tokenizer files by name only load as schema 2 (presence checked at load) but are refused
    as schema 3, which promises a size and sha256 for every file the runtime reads."""
    raw = json.loads((GOLDEN / "schema2" / "manifest.json").read_text())
    assert Manifest.from_dict(raw).tokenizer.files[1] == DataFile("tokenizer.json", None, None)
    raw["schema_version"] = 3
    with pytest.raises(ManifestError, match=r"tokenizer.files\[0\].sha256 must be 64 hex digits"):
        Manifest.from_dict(raw)
