"""Manifest structure and value checks (`Manifest.from_dict`) and role lookups, on small synthetic manifests."""

import copy
import json
import math

import pytest

from runtime.manifest import FORMAT, SCHEMA_VERSION, Manifest, ManifestError, from_json_thresholds, target_key, \
    to_json_thresholds


def tensor(role, name=None, layer=None):
    return {"role": role, "name": name or role, "dtype": "float32", "shape": ["batch"], "layer": layer}


def graph(file, inputs, outputs):
    return {"file": file, "sha256": "0" * 64, "size": 1, "inputs": inputs, "outputs": outputs}


def segment(index, first, end, exit_head=None, last=False):
    ins = [tensor("input_ids" if index == 0 else "hidden", "x_in" if index else "ids")]
    ins += [tensor("past_key", f"pk.{i}", i) for i in range(first, end)]
    outs = [tensor("token", "tok"), tensor("confidence", "conf"), tensor("hidden_out", "h")]
    exit = None if last else {"exit_layer": end, "confidence": "top1", "head": exit_head}
    return {"index": index, "layers": [first, end], **graph(f"segment_{index:02d}.onnx", ins, outs), "exit": exit}


def manifest(bounds=((0, 2), (2, 4), (4, 6)), num_layers=6, heads=0, exit_head=None) -> dict:
    segs = [segment(k, a, b, exit_head, last=k == len(bounds) - 1) for k, (a, b) in enumerate(bounds)]
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "model": {"base_model": "tiny", "family": "llama", "num_layers": num_layers, "hidden_size": 8,
                      "num_kv_heads": 1, "head_dim": 8, "vocab_size": 16, "max_context": 32},
            "tokenizer": {"files": [{"file": "tokenizer.json", "sha256": "0" * 64, "size": 1}], "bos_id": None,
                          "eos_ids": [0], "pad_id": None},
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


# -- values the runtime relies on (issue 26) ---------------------------------------------------------
NAN = float("nan")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["calibration"].update(thresholds=[NAN, 0.5]), r"calibration.thresholds\[0\] must be a number \(not NaN\)"),
    (lambda d: d["calibration"].update(thresholds=["0.5", 0.5]), r"calibration.thresholds\[0\] must be a number"),
    (lambda d: d["calibration"].update(thresholds=[0.5]), r"calibration.thresholds has 1 thresholds for 2 exits"),
    (lambda d: d["calibration"].update(by_target={"0.9": [0.5, NAN]}), r"by_target\['0.9'\]\[1\] must be a number"),
    (lambda d: d["calibration"].update(by_target={"high": [0.5, 0.5]}), r"by_target key 'high' is not a target"),
    (lambda d: d["model"].update(vocab_size=-5), r"model.vocab_size must be an integer >= 1, got -5"),
    (lambda d: d["model"].update(num_kv_heads=0), r"model.num_kv_heads must be an integer >= 1, got 0"),
    (lambda d: d["model"].update(max_context=2.5), r"model.max_context must be an integer >= 1"),
    (lambda d: d["model"].update(hidden_size=True), r"model.hidden_size must be an integer"),
    (lambda d: d["tokenizer"].update(eos_ids=[16]), r"tokenizer.eos_ids\[0\] must be an integer in \[0, 15\]"),
    (lambda d: d["tokenizer"].update(bos_id=-1), r"tokenizer.bos_id must be an integer in \[0, 15\]"),
    (lambda d: d["tokenizer"]["files"][0].update(file="../../etc/passwd"), r"tokenizer.files\[0\] must name a file "
                                                                            r"inside the export folder"),
    (lambda d: d["tokenizer"]["files"][0].update(sha256=None), r"tokenizer.files\[0\].sha256 must be 64 hex"),
    (lambda d: d["tokenizer"].update(files=[{"file": "vocab.txt", "sha256": "0" * 64, "size": 1}]),
     r"tokenizer.files must list tokenizer.json"),
    (lambda d: d["segments"][1].update(file="/tmp/segment.onnx"), r"segments\[1\].file must name a file inside"),
    (lambda d: d["segments"][1].update(size=-1), r"segments\[1\].size must be an integer >= 0"),
    (lambda d: d["segments"][1].update(index=5), r"segments\[1\].index must be an integer in \[1, 1\]"),
    (lambda d: d["segments"][0]["exit"].update(confidence="entropy"), r"exit.confidence must be one of"),
    (lambda d: d.update(precision="int3"), r"precision must be one of \['fp32', 'fp16', 'int8', 'int4'\]"),
    (lambda d: d.update(dims={"decode_sequence": {"min": 1, "opt": 1, "max": 0}}),
     r"dims\['decode_sequence'\].max must be an integer >= 1"),
    (lambda d: d.update(dims={"batch": {"min": 1, "opt": "one", "max": 8}}), r"dims\['batch'\].opt must be an integer"),
])
def test_values_are_checked_where_the_manifest_enters(edit, message):
    d = manifest(bounds=((0, 2), (2, 4), (4, 6)))
    d["calibration"]["thresholds"] = [0.5, 0.5]
    Manifest.from_dict(copy.deepcopy(d))  # valid as it is
    edit(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d, "x/manifest.json")
    # a NaN written by Python's json (it writes and reads NaN by default) is refused the same way
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(json.loads(json.dumps(d)))


def test_nan_threshold_in_a_manifest_file_is_refused(tmp_path):
    d = manifest()
    d["calibration"]["thresholds"] = [0.5, NAN]
    (tmp_path / "manifest.json").write_text(json.dumps(d))  # json writes NaN as a bare literal
    assert "NaN" in (tmp_path / "manifest.json").read_text()
    with pytest.raises(ManifestError, match=r"manifest.json: calibration.thresholds\[1\] must be a number \(not NaN\)"):
        Manifest.load(tmp_path)


def test_a_bad_manifest_is_never_written(tmp_path):
    m = Manifest.from_dict(manifest())
    import dataclasses

    bad = dataclasses.replace(m, model=dataclasses.replace(m.model, vocab_size=-1))
    with pytest.raises(ManifestError, match="model.vocab_size"):
        bad.save(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_one_copy_of_thresholds_and_kv_layout():
    """Schema 3 keeps one copy of each fact: the thresholds in calibration (an exit has none),
    the KV layout in kv_cache (no kv_layout string). Older manifests that carry the copies still
    load, and the copies do not count, even where they disagree."""
    m = Manifest.from_dict(manifest())
    written = json.loads(m.to_json())
    assert "kv_layout" not in written
    assert all("threshold" not in s["exit"] for s in written["segments"] if s["exit"])
    old = manifest()
    old["schema_version"] = 2
    old["kv_layout"] = "batch,position,kv_heads,head_dim"  # never read: it cannot clash with kv_cache
    for s in old["segments"][:-1]:
        s["exit"]["threshold"] = 0.99  # disagrees with calibration.thresholds (0.5): calibration wins
    old["tokenizer"]["files"] = ["tokenizer.json", "tokenizer_config.json"]  # names only before schema 3
    m2 = Manifest.from_dict(old)
    assert m2.calibration.thresholds == (0.5, 0.5) and m2.kv_cache.layout == "concat"
    assert [(f.file, f.sha256, f.size) for f in m2.tokenizer.files] == [("tokenizer.json", None, None),
                                                                       ("tokenizer_config.json", None, None)]
    assert not hasattr(m2.segments[0].exit, "threshold") and not hasattr(m2, "kv_layout")
    # schema 3 needs the checksums
    new = manifest()
    new["tokenizer"]["files"] = ["tokenizer.json"]
    with pytest.raises(ManifestError, match=r"tokenizer.files\[0\].sha256 must be 64 hex digits"):
        Manifest.from_dict(new)


def test_infinite_thresholds_read_as_never():
    d = manifest()
    d["calibration"]["thresholds"] = [None, math.inf]
    assert from_json_thresholds(Manifest.from_dict(d).calibration.thresholds) == [math.inf, math.inf]
