"""`Checkpoint`: the folder is read once and handed on through `lama export`."""

from collections import Counter

from conftest import make_checkpoint

from exporter import api
from exporter.checkpoint import Checkpoint, CheckpointConfig
from exporter.scores import ExitScores
from runtime.manifest import Manifest


def test_export_reads_the_checkpoint_once(tmp_path, monkeypatch):
    ckpt, bb = make_checkpoint(tmp_path, "llama")
    reads = Counter()
    from_json, load = CheckpointConfig.from_json.__func__, ExitScores.load.__func__

    def counted_config(cls, text, where=""):
        reads["lama.json"] += 1
        return from_json(cls, text, where)

    def counted_scores(cls, path):
        reads[path.name] += 1
        return load(cls, path)

    monkeypatch.setattr(CheckpointConfig, "from_json", classmethod(counted_config))
    monkeypatch.setattr(ExitScores, "load", classmethod(counted_scores))
    out = api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    assert reads["lama.json"] == 1
    assert reads["calibration_scores.npz"] == 1  # the threshold table's scores
    assert max(reads.values()) == 1
    assert len(Manifest.load(out).segments) == 4


def test_scores_are_kept_and_shared(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, "llama")
    c = Checkpoint.open(ckpt)
    assert Checkpoint.open(c) is c
    assert c.scores("calibration") is c.scores("calibration", "head")
    other = c.with_config(c.config)
    assert other.scores("calibration") is c.scores("calibration")
