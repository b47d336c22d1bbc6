"""`lama` end to end on a tiny model, through the CLI's own entry point (main(argv)):
train -> calibrate (with a guarantee) -> export (fp16, gates) -> generate."""

import json

import pytest
from conftest import SAMPLE_TEXT, char_tokenizer, tiny_model

from lama import cli
from runtime import Runtime

PROMPT = "It is a truth"


@pytest.fixture
def tiny_recipe(tmp_path):
    """A saved tiny llama (with two EOS ids in its generation_config, as SmolLM2 lists several),
    a recipe file pointing at it, and a text file."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = [5, 7]
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    recipe = {"name": "tiny", "source": {"model_id": str(tmp_path / "model")}, "exits": [1, 2, 3],
              "confidence": "gate", "target": 0.9,
              "train": {"rank": 4, "seq_len": 32, "train_tokens": 2000, "calib_tokens": 1600, "heldout_tokens": 640,
                        "steps": 20, "batch_tokens": 256, "gates": True, "gate_width": 8, "gate_steps": 50}}
    (tmp_path / "tiny.json").write_text(json.dumps(recipe))
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    return tmp_path


def test_cli_end_to_end(tiny_recipe, capsys):
    d = tiny_recipe
    ck, onnx = d / "ck", d / "onnx"
    assert cli.main(["train", str(d / "tiny.json"), "--out", str(ck), "--data", str(d / "text.txt")]) == 0
    out = capsys.readouterr().out
    assert "trained 3 adapter heads" in out and f"checkpoint: {ck}" in out

    assert cli.main(["calibrate", str(ck), "--target", "0.8", "--delta", "0.2", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert set(reports) == {"calibration", "heldout"}
    assert reports["calibration"]["delta"] == 0.2 and len(reports["heldout"]["exits"]) == 3

    assert cli.main(["export", str(ck), "--out", str(onnx), "--precision", "fp16"]) == 0
    assert f"exported to {onnx}" in capsys.readouterr().out
    rt = Runtime.load(onnx)
    assert rt.manifest.precision == "fp16" and rt.manifest.segments[0].exit.confidence == "gate"
    assert rt.manifest.tokenizer.eos_ids == (5, 7) and rt.manifest.calibration.by_target_delta == 0.2

    for extra in ([], ["--full"], ["--target", "0.9"]):
        assert cli.main(["generate", str(onnx), PROMPT, "--max-new-tokens", "8", *extra]) == 0
        captured = capsys.readouterr()
        th = "never" if extra == ["--full"] else (0.9 if extra else None)
        assert captured.out == rt.generate(PROMPT, 8, thresholds=th).text + "\n"
        assert "tokens" in captured.err  # the summary goes to stderr, the text alone to stdout


def test_cli_errors_are_one_line(tiny_recipe, capsys):
    assert cli.main(["calibrate", str(tiny_recipe / "missing"), "--target", "0.9"]) == 2
    assert "lama calibrate: error:" in capsys.readouterr().err
    assert cli.main(["generate", str(tiny_recipe / "missing"), PROMPT]) == 2
    assert "lama generate: error: export folder not found" in capsys.readouterr().err
