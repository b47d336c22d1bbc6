"""Manifest structure checks (`Manifest.from_dict`) and role lookups, on small synthetic manifests."""

import copy

import pytest

from runtime.manifest import FORMAT, SCHEMA_VERSION, Manifest, ManifestError, from_json_thresholds, target_key, \
    to_json_thresholds


def tensor(role, name=None, layer=None):
    return {"role": role, "name": name or role, "dtype": "float32", "shape": ["batch"], "layer": layer}


def graph(file, inputs, outputs):
    return {"file": file, "sha256": "0", "size": 1, "inputs": inputs, "outputs": outputs}


def segment(index, first, end, exit_head=None, last=False):
    ins = [tensor("input_ids" if index == 0 else "hidden", "x_in" if index else "ids")]
    ins += [tensor("past_key", f"pk.{i}", i) for i in range(first, end)]
    outs = [tensor("token", "tok"), tensor("confidence", "conf"), tensor("hidden_out", "h")]
    exit = None if last else {"exit_layer": end, "confidence": "top1", "threshold": 0.5, "head": exit_head}
    return {"index": index, "layers": [first, end], **graph(f"segment_{index:02d}.onnx", ins, outs), "exit": exit}


def manifest(bounds=((0, 2), (2, 4), (4, 6)), num_layers=6, heads=0, exit_head=None) -> dict:
    segs = [segment(k, a, b, exit_head, last=k == len(bounds) - 1) for k, (a, b) in enumerate(bounds)]
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "model": {"base_model": "tiny", "family": "llama", "num_layers": num_layers, "hidden_size": 8,
                      "num_kv_heads": 1, "head_dim": 8, "vocab_size": 16, "max_context": 32},
            "tokenizer": {"files": ["tokenizer.json"], "bos_id": None, "eos_ids": [0], "pad_id": None},
            "segments": segs,
            "calibration": {"confidence": "top1", "policy": {}, "thresholds": [0.5] * (len(segs) - 1),
                            "by_target": {}, "report": {}},
            "precision": "fp32", "dims": {},
            "heads": [graph(f"head_{i}.onnx", [tensor("exit_hidden")], [tensor("token")]) for i in range(heads)]}


def test_valid_manifest_reads_and_round_trips():
    m = Manifest.from_dict(manifest())
    assert [s.layers for s in m.segments] == [(0, 2), (2, 4), (4, 6)]
    assert Manifest.from_dict(__import__("json").loads(m.to_json())) == m


@pytest.mark.parametrize("bounds, num_layers, message", [
    (((1, 2), (2, 4), (4, 6)), 6, r"segment 0 starts at layer 1, not at the model's first layer 0"),
    (((0, 2), (3, 4), (4, 6)), 6, r"segment 1 starts at layer 3, not at where segment 0 ends \(2\)"),
    (((0, 2), (2, 4), (4, 5)), 6, r"cover layers \[0, 5\), but the model has 6 layers"),
    (((0, 2), (2, 2), (2, 6)), 6, r"segment 1 has the empty layer range \[2, 2\)"),
])
def test_layer_ranges_must_chain_the_model(bounds, num_layers, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(manifest(bounds, num_layers))


def test_exit_must_sit_at_its_segment_end():
    d = manifest()
    d["segments"][1]["exit"]["exit_layer"] = 3
    with pytest.raises(ManifestError, match=r"segment 1's exit is after layer 3, but the segment ends at layer 4"):
        Manifest.from_dict(d)


def test_every_segment_but_the_last_has_an_exit():
    d = manifest()
    d["segments"][0]["exit"] = None
    with pytest.raises(ManifestError, match="segment 0 has no exit"):
        Manifest.from_dict(d)
    d = manifest()
    d["segments"][2]["exit"] = copy.deepcopy(d["segments"][1]["exit"]) | {"exit_layer": 6}
    with pytest.raises(ManifestError, match=r"the last segment \(2\) has an exit"):
        Manifest.from_dict(d)


def test_head_index_must_exist():
    Manifest.from_dict(manifest(heads=1, exit_head=0))  # valid: one head graph, index 0
    with pytest.raises(ManifestError, match=r"segment 0's exit runs head 1, but the manifest lists 1 head graph"):
        Manifest.from_dict(manifest(heads=1, exit_head=1))
    with pytest.raises(ManifestError, match=r"runs head 0, but the manifest lists 0 head graph"):
        Manifest.from_dict(manifest(heads=0, exit_head=0))


def test_no_segments():
    d = manifest()
    d["segments"] = []
    with pytest.raises(ManifestError, match="lists no segments"):
        Manifest.from_dict(d)


def test_roles_map_to_the_graphs_names():
    m = Manifest.from_dict(manifest())
    seg = m.segments[1]
    assert seg.names["confidence"] == "conf" and seg.name("hidden_out") == "h"
    assert "past_key" not in seg.names  # per-layer roles go through per_layer
    assert [t.name for t in seg.per_layer(seg.inputs, "past_key")] == ["pk.2", "pk.3"]
    assert seg.entry_role == "hidden" and m.segments[0].entry_role == "input_ids"
    # inputs by role -> by name; roles this graph does not take are dropped
    assert seg.feeds({"hidden": 1, "attention_mask": 2}) == {"x_in": 1}
    with pytest.raises(ManifestError, match="has no tensor with role 'logits'"):
        seg.name("logits")


def test_threshold_conversions_are_inverse():
    values = [0.25, float("inf"), 0.0]
    assert to_json_thresholds(values) == [0.25, None, 0.0]
    assert from_json_thresholds(to_json_thresholds(values)) == values
    assert target_key(0.95) == "0.95" and target_key(1) == "1"
