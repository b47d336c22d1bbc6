"""The `lama` commands end to end on a tiny export, as a user (or a script) runs them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import SCHEMA_VERSION, Runtime

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally acknowledged"
# what a device without the host extras looks like: torch and transformers cannot be imported
NO_TORCH = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "from lama.cli import main; sys.exit(main(sys.argv[1:]))")


def lama(*args, stdin: str | None = None, no_torch: bool = False, check: bool = True):
    cmd = [sys.executable, "-c", NO_TORCH] if no_torch else [sys.executable, "-m", "lama"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd + [str(a) for a in args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def calibrated(chat_export, tmp_path_factory):
    """The chat export with thresholds, a target table and a report, as a calibrated export has."""
    dst = tmp_path_factory.mktemp("cli") / "onnx"
    shutil.copytree(chat_export[0], dst)
    m = json.loads((dst / "manifest.json").read_text())
    cal = m["calibration"]
    cal["thresholds"] = [0.8125, 0.6875, None]
    cal["by_target"] = {"0.9": [0.5625, 0.4375, 0.3125], "0.99": [0.9375, None, None]}
    cal["report"] = {"split": "heldout", "tokens": 321, "agreement": 0.9612, "layers_fraction": 0.87,
                     "compute_fraction": 0.88,
                     "exits": [{"exit_layer": e, "threshold": t, "coverage": 0.1, "agreement": 0.97}
                               for e, t in zip((1, 2, 3), cal["thresholds"])]}
    for seg, t in zip(m["segments"], cal["thresholds"]):
        seg["exit"]["threshold"] = t
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_version():
    out = lama("--version").stdout
    assert out.startswith("lama ") and f"manifest schema {SCHEMA_VERSION}" in out and "onnxruntime" in out


def test_inspect_lists_segments_and_thresholds(calibrated):
    text = lama("inspect", calibrated).stdout
    m = Runtime.load(calibrated).manifest
    for seg in m.segments:
        assert f"segment {seg.index}: layers {seg.layers[0]}-{seg.layers[1] - 1}, {seg.file}" in text
    for t in ("0.8125", "0.6875", "0.5625", "0.4375", "0.3125", "0.9375"):
        assert t in text
    assert "target 0.9: 0.5625, 0.4375, 0.3125" in text and "target 0.99: 0.9375, never, never" in text
    assert "overall agreement 0.9612" in text and "sampling: top-64 logits" in text
    assert "onnxruntime: available" in text and "chat_template.jinja" in text
    info = json.loads(lama("inspect", calibrated, "--json").stdout)
    assert [s["file"] for s in info["segments"]] == [s.file for s in m.segments]
    assert [s["exit"]["threshold"] if s["exit"] else "final" for s in info["segments"]] == [0.8125, 0.6875, None,
                                                                                          "final"]


def test_generate_matches_the_api(calibrated):
    rt = Runtime.load(calibrated)
    ref = rt.generate(PROMPT, 12)
    out = lama("generate", calibrated, PROMPT, "--max-new-tokens", 12, "--threads", 1, "--json")
    got = json.loads(out.stdout)
    assert got["tokens"] == list(ref.tokens) and got["text"] == ref.text
    assert got["stop_reason"] == "max_new_tokens" and len(got["records"]) == 12
    streamed = lama("generate", calibrated, PROMPT, "--max-new-tokens", 12, "--full")
    assert streamed.stdout == rt.generate(PROMPT, 12, thresholds="never").text + "\n"
    assert "tokens/s" in streamed.stderr and "stop: max_new_tokens" in streamed.stderr
    sampled = json.loads(lama("generate", calibrated, PROMPT, "--max-new-tokens", 12, "--temperature", 0.9,
                              "--top-p", 0.9, "--seed", 3, "--stop", ref.text[4:6], "--json").stdout)
    api = rt.generate(PROMPT, 12, temperature=0.9, top_p=0.9, seed=3, stop=ref.text[4:6])
    assert sampled["tokens"] == list(api.tokens) and sampled["stop_reason"] == api.stop_reason
    chat = json.loads(lama("generate", calibrated, "Hi", "--chat", "--system", "Be brief.", "--json").stdout)
    assert chat["tokens"] == list(rt.chat([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}], 32).tokens)


def test_chat_from_stdin_keeps_the_cache(calibrated):
    out = lama("chat", calibrated, "--max-new-tokens", 8, "--json", stdin="Hello there\n\nAnd then?\n/exit\nignored\n")
    turns = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(turns) == 2 and all(t["role"] == "assistant" for t in turns)
    rt = Runtime.load(calibrated)
    conv = [{"role": "user", "content": "Hello there"}]
    first = rt.chat(conv, 8)
    second = rt.chat(conv + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}], 8)
    assert [t["content"] for t in turns] == [first.text, second.text]
    assert turns[0]["cached_tokens"] == 0 and turns[1]["cached_tokens"] == second.cached_tokens > 0
    text = lama("chat", calibrated, "--max-new-tokens", 4, stdin="Hello there\n/reset\nHello there\n")
    assert text.stdout.splitlines()[0] == text.stdout.splitlines()[1] != ""
    assert text.stderr.count("stop: max_new_tokens") == 2 and "from the kept cache" not in text.stderr


def test_device_install_without_torch(calibrated):
    out = lama("generate", calibrated, PROMPT, "--max-new-tokens", 4, "--json", no_torch=True)
    assert len(json.loads(out.stdout)["tokens"]) == 4
    assert "segment 0" in lama("inspect", calibrated, no_torch=True).stdout
    r = lama("train", "smollm2-135m", "--out", "x", no_torch=True, check=False)
    assert r.returncode != 0 and "pip install 'lama-ee[export]'" in r.stderr and "torch" in r.stderr
    assert "train" in lama("--help", no_torch=True).stdout


def test_device_commands_stand_alone_without_the_exporter(calibrated):
    """runtime/cli.py is the device side on its own: it runs with exporter/ and lama/ unimportable
    (`lama/cli.py` composes it with the host commands; runtime imports neither)."""
    code = ("import sys; sys.modules['torch'] = sys.modules['exporter'] = sys.modules['lama'] = None; "
            "from runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(calibrated)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "segment 0" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "generate" in r.stdout and "train" not in r.stdout


def test_clear_errors(calibrated, tmp_path):
    r = lama("generate", tmp_path, PROMPT, check=False)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = lama("generate", calibrated, PROMPT, "--top-p", 2, check=False)
    assert r.returncode == 2 and "top_p must be a finite number in (0, 1]" in r.stderr
    dst = tmp_path / "plain"
    shutil.copytree(calibrated, dst)
    (dst / "chat_template.jinja").unlink()  # an export made without a template: not in its manifest either
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"]["files"] = [f for f in m["tokenizer"]["files"] if f["file"] != "chat_template.jinja"]
    m["tokenizer"]["chat_template"] = None
    (dst / "manifest.json").write_text(json.dumps(m))
    r = lama("chat", dst, stdin="hi\n", check=False)
    assert r.returncode == 2 and "has no chat template" in r.stderr and "--chat-template" in r.stderr


def test_inspect_budget_policy_and_missing_file(calibrated, tmp_path):
    from runtime.inspect_export import describe, render

    dst = tmp_path / "budget"
    shutil.copytree(calibrated, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["calibration"]["policy"] = {"kind": "budget", "budget": 0.6, "mu": 0.125}
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "segment_01.onnx").unlink()
    text = render(describe(dst))
    assert "compute budget 0.6 of the full model (EERO, mu 0.125)" in text
    assert "segment_01.onnx (" in text and "[FILE MISSING]" in text


def test_stop_strings_from_a_shell_understand_escapes():
    from runtime.cli import unescape

    assert unescape("a\\n\\nb") == "a\n\nb" and unescape("é\\t中") == "é\t中" and unescape("x\\\\n") == "x\\n"
