"""`Checkpoint`: the folder is read once and handed on through `lama export`."""

from collections import Counter
from pathlib import Path

import pytest
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


# -- save_checkpoint replaces only a checkpoint (issue 26, item 1) ---------------------------------

def _tiny_save(out, **kw):
    from exporter.checkpoint import save_checkpoint
    from exporter.heads import ExitHeads
    from exporter.recipes import ModelSource

    from conftest import tiny_backbone

    bb = tiny_backbone("llama")
    heads = ExitHeads("adapter", [1, 3], bb.shape.hidden_size, bb.family.final_norm, bb.family.lm_head, rank=4)
    cfg = CheckpointConfig(source=ModelSource("tiny"), exits=[1, 3], num_layers=4, head="adapter", rank=4,
                           thresholds=[0.5, None])
    return save_checkpoint(out, cfg, heads, **kw)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    (runs / "smollm2").mkdir(parents=True)
    (runs / "smollm2" / "lama.json").write_text('{"format": "lama-checkpoint"}')
    (runs / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"{runs} exists and is not a LAMA checkpoint.*--overwrite"):
        _tiny_save(runs)
    assert (runs / "notes.txt").read_text() == "keep me" and (runs / "smollm2" / "lama.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # no temporary folder left behind
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        _tiny_save(file)
    assert file.read_text() == "x"


def test_save_replaces_a_checkpoint_an_empty_folder_or_anything_when_asked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_tiny_save(empty) / "lama.json").is_file()
    (empty / "heads.safetensors").unlink()
    assert (_tiny_save(empty) / "heads.safetensors").is_file()  # a checkpoint is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("x")
    _tiny_save(other, overwrite=True)
    assert not (other / "data.bin").exists() and (other / "lama.json").is_file()


def test_lama_train_refuses_a_non_checkpoint_out_before_training(tmp_path, capsys):
    from lama.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "other-run.log").write_text("keep me")
    assert main(["train", str(tmp_path / "no-such-model"), "--out", str(runs)]) == 2
    err = capsys.readouterr().err
    assert f"{runs} exists and is not a LAMA checkpoint" in err and "--overwrite" in err
    assert (runs / "other-run.log").read_text() == "keep me"


# -- the windows a checkpoint redraws are checked (issue 26, item 6) -------------------------------

def test_splits_are_checked_against_the_recorded_windows(tmp_path):
    import warnings

    from exporter.api import _rewrite_config

    ckpt, bb = make_checkpoint(tmp_path, "llama")
    c = Checkpoint.open(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hash is recorded and matches: no warning
        assert c.splits(bb.tokenizer)["calib"].num_tokens == 640
    text = Path(c.config.train["data"][0])
    text.write_text(text.read_text().replace("truth", "fact"))  # the training text changed since
    with pytest.raises(ValueError, match=r"does not give the windows `lama train` drew.*calib.*--data"):
        c.splits(bb.tokenizer)
    config = c.config
    del config.train["windows_sha256"]  # a checkpoint from before the hash was recorded
    _rewrite_config(ckpt, config)
    with pytest.warns(UserWarning, match="no hash of the training windows"):
        Checkpoint.open(ckpt).splits(bb.tokenizer)


def test_default_data_dir_comes_from_the_environment_or_the_working_folder(tmp_path, monkeypatch):
    from exporter import data

    monkeypatch.setenv("LAMA_DATA", str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError, match=r"\$LAMA_DATA is .*text.*does not exist"):
        data.default_data_dir()
    (tmp_path / "text").mkdir()
    assert data.default_data_dir() == tmp_path / "text"
    monkeypatch.delenv("LAMA_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data.default_data_dir() == tmp_path / "shared" / "data"  # ../shared/data from where lama runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "CHECKOUT_DATA", tmp_path / "site-packages" / "shared" / "data")
    with pytest.raises(FileNotFoundError, match=r"tried \$LAMA_DATA \(not set\), .*shared/data.*pass --data"):
        data.default_data_dir()
