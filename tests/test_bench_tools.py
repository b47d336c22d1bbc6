"""benchmarks/studies/profile_chain.py on a tiny export, and the llama.cpp worker's protocol wiring."""

import importlib
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint

from exporter import api

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """benchmarks.NAME (e.g. "run", "studies.profile_chain"), executed afresh: stand-ins that a test
    put in sys.modules (llama_cpp, onnxruntime_genai) apply even when an earlier test imported it."""
    return importlib.reload(importlib.import_module(f"benchmarks.{name}"))


def test_profile_chain_splits_each_token(tmp_path, precision="int4"):
    ckpt, bb = make_checkpoint(tmp_path, "llama")
    folder = api.export(ckpt, out=tmp_path / "onnx", precision=precision, backbone=bb)
    prof = _load("studies.profile_chain")
    p = prof.profile(folder, "It is a truth", 6, "never", 1, tmp_path / "prof")
    t = p["totals"]
    assert p["decode_tokens"] == 5 and p["precision"] == precision
    assert t["run_calls_per_token"] == len(p["segments"]) == 4  # exits off: every segment, once per token
    parts = [t["kernels_ms"], t["ort_executor_ms"], t["binding_ms"], t["kv_cache_ms"], t["python_glue_ms"]]
    # each part timed on its own (nested clocks count their own time only): none negative, and they
    # add up to step() up to the clocks' own overhead
    assert min(parts) >= 0, parts
    assert sum(parts) == pytest.approx(t["token_ms"], rel=0.02)
    assert t["kernels_ms"] > 0 and all(s["kernels_ms"] > 0 and s["binding_ms"] >= 0 for s in p["segments"])
    assert "MatMulNBits" in p["kernels_by_op_ms"]
    assert "| kernels (onnxruntime profiler) |" in prof.markdown(p)


def test_llamacpp_worker_speaks_the_benchmark_protocol(tmp_path, monkeypatch):
    """The worker registers its backend in optimum_worker's table and answers ready/pass/quit
    (with a stand-in for llama_cpp.Llama: the real one lives in benchmarks/.venv-llamacpp)."""
    import types

    class FakeLlama:
        def __init__(self, model_path, n_ctx, n_threads, **kw):
            self.threads = n_threads
            self._n_ctx = n_ctx

        def reset(self):
            pass

        def n_ctx(self):
            return self._n_ctx

        def generate(self, ids, temp, **kw):
            assert temp == 0.0  # greedy
            t = ids[-1]
            while True:  # never stops on its own: the worker must stop after max_new_tokens
                t = (t * 7 + 1) % 97
                yield t

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    worker = _load("llamacpp_worker")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    spec = {"backend": "llamacpp", "prompts": [[1, 2, 3], [4, 5]], "max_new_tokens": 5, "threads": 2,
            "gguf_path": str(gguf)}
    out = io.StringIO()
    worker.optimum_worker.serve(spec, inp=io.StringIO("pass\nquit\n"), out=out)
    ready, passed, summary = [json.loads(x) for x in out.getvalue().splitlines()]
    assert ready["ready"] and summary["backend"] == "llamacpp" and summary["info"]["n_threads"] == 2
    assert [len(t) for t in passed["tokens"]] == [5, 5]
    assert passed["tokens"][0][0] == (3 * 7 + 1) % 97


def test_ratios_are_paired_by_round_with_an_interval():
    """run.derive: speed-ups and the llama.cpp ratio are medians of per-round ratios, with a
    bootstrap interval that is narrow when two rows move together round by round (drifting
    load cancels) and holds 1.00 when they do not differ beyond the noise."""
    run = _load("run")
    drift = [60.0, 45.0, 70.0, 52.0, 66.0, 40.0, 58.0, 63.0, 49.0]  # the machine's speed, round by round
    rows = [{"row": "b: optimum", "kind": "full", "measured": {"tokens_per_second_runs": [x / 3 for x in drift]}},
            {"row": "f: llama.cpp", "kind": "full", "measured": {"tokens_per_second_runs": drift}},
            {"row": "g: int4 chain, exits off", "kind": "quant-full",
             "measured": {"tokens_per_second_runs": [0.8 * x * (1 + 0.01 * (-1) ** i) for i, x in enumerate(drift)]}},
            {"row": "g: noisy", "kind": "quant-full",
             "measured": {"tokens_per_second_runs": [x * (1 + 0.2 * (-1) ** i) for i, x in enumerate(drift)]}}]
    for r in rows:
        m = r["measured"]
        m.update(tokens_per_second=sorted(m["tokens_per_second_runs"])[4], first_token_seconds=0.1,
                 peak_rss_mb=1.0, rss_after_imports_mb=1.0, tokens=[[1, 2]])
    run.derive(rows, num_layers=30, oracle_layers=30.0, oracle_tf={})
    g, noisy = rows[2], rows[3]
    assert g["vs_llamacpp"] == pytest.approx(0.8, rel=0.02) and g["speedup"] == pytest.approx(2.4, rel=0.02)
    lo, hi = g["vs_llamacpp_ci95"]
    assert 0.78 < lo <= 0.8 <= hi < 0.82  # a 40% swing of the machine's speed, yet a 2% interval
    lo, hi = noisy["vs_llamacpp_ci95"]
    assert lo < 1.0 < hi  # within noise: the interval says so
    assert run.ratio_interval([1.0, 1.1]) is None  # too few rounds for an interval


def test_gate_references_consistency_streak_and_fit():
    import numpy as np
    import torch

    ref = _load("studies.gate_references")
    top1 = np.array([[1, 1, 1, 2], [3, 1, 1, 1], [5, 6, 5, 5]])
    same, streak = ref.consistency(top1, 3)
    assert same.tolist() == [0, 1, 1] and streak.tolist() == [0, 2, 1]  # row 3: exit 2 agrees, exit 1 breaks it
    assert ref.consistency(top1, 0)[1].tolist() == [0, 0, 0]

    # the fit ranks by the informative feature, not the noise one
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-3 * x[:, 0]))
    s = ref.logistic_scores(x[:2000], y[:2000], x[2000:])
    assert np.corrcoef(s, x[2000:, 0])[0, 1] > 0.99

    # top words: chunked, over the whole vocabulary and within a shortlist, equal to a plain argmax
    class Heads:
        exits = [0, 1]
        w = torch.randn(50, 8)

        def vocab_matrix(self, k):
            return self.w * (k + 1), None

        def vocab_input(self, k, h):
            return h + k

    class Feats:
        h = torch.randn(7, 8)
        num_tokens, active = 7, np.arange(7)

        def hidden(self, k, rows):
            return self.h[rows]

    heads, feats = Heads(), Feats()
    short_ids = torch.tensor([4, 9, 17, 30])
    full = ref.top_words(heads, feats, short_ids, chunk=3)
    for k in range(2):
        logits = (feats.h + k) @ (heads.w * (k + 1)).T
        p = torch.softmax(logits, -1)
        assert full["top1"][:, k].tolist() == logits.argmax(-1).tolist()
        assert np.allclose(full["p"][:, k, 0], p.max(-1).values.numpy(), atol=1e-6)
        assert full["shortlist_top1"][:, k].tolist() == short_ids[logits[:, short_ids].argmax(-1)].tolist()


def test_compare_exports_pairs_two_folders(tmp_path):
    ckpt, bb = make_checkpoint(tmp_path, "llama")
    folder = api.export(ckpt, out=tmp_path / "onnx", backbone=bb)
    cmp = _load("compare_exports")
    res = cmp.compare(folder, folder, rounds=3, threads=1, new_tokens=3, prompts=("Once upon", "It is"))
    assert len(res["passes"]["a"]) == len(res["passes"]["b"]) == 3
    assert res["b_over_a"] > 0 and len(res["b_over_a_ci95"]) == 2
    assert res["b_over_a_ci95"][0] <= res["b_over_a"] <= res["b_over_a_ci95"][1]
    assert "B / A" in cmp.markdown(res)
    with pytest.raises(SystemExit):  # not an export folder: a clear usage error, not a traceback
        cmp.main([str(tmp_path), str(folder)])
    with pytest.raises(SystemExit):
        cmp.main([str(folder), str(folder), "--thresholds-b", "most"])


def test_kv_buffer_probe_writes_its_table(tmp_path):
    import types

    from benchmarks.studies import kv_buffer_probe as probe

    args = types.SimpleNamespace(chain=False, layers=30, threads=2, steps=16, rounds=5, out=tmp_path)
    rows = [{"context": 32, "concat_ms": 50.0, "buffer_ms": 40.0, "concat_cpu_ms": 1, "buffer_cpu_ms": 1, "load": 0.1},
            {"context": 2048, "concat_ms": 120.0, "buffer_ms": 60.0, "concat_cpu_ms": 1, "buffer_cpu_ms": 1, "load": 0.1}]
    probe.write_report(args, rows, (0.1, 0.1, 0.1), (0.2, 0.2, 0.2))
    assert json.loads((tmp_path / "kv_buffer.json").read_text())["rows"][1]["context"] == 2048
    md = (tmp_path / "kv_buffer.md").read_text()
    assert "| 2048 | 120.00 | 60.00 | 8.3 | 16.7 | 2.00x |" in md


# -- row h: onnxruntime-genai (its venv, benchmarks/.venv-genai, is absent on CI) --------------------
GENAI_PYTHON = ROOT / "benchmarks" / ".venv-genai" / "bin" / "python"
EOS = 2


def _fake_genai(seen: dict):
    """A stand-in for onnxruntime_genai: greedy 'next = prev * 7 + 1 mod 97' that, like genai,
    stops at EOS (2) without feeding that token to the model; logits for every prefill position."""
    import types

    import numpy as np

    class Config:
        def __init__(self, folder):
            seen["folder"] = folder

        def clear_providers(self):
            seen["cpu"] = True

        def overlay(self, text):
            seen["overlay"] = json.loads(text)

    class Generator:
        def __init__(self, model, params):
            self.seq, self.done, self.max_length = [], False, params.max_length

        def append_tokens(self, batch):
            self.seq += list(batch[0])
            self.done = False
            self.last_prefill = list(batch[0])

        def is_done(self):
            return self.done or len(self.seq) >= self.max_length

        def generate_next_token(self):
            assert not self.is_done()
            self.next = (self.seq[-1] * 7 + 1) % 97
            if self.next == EOS:
                self.done = True  # not appended, as genai does
            else:
                self.seq.append(self.next)

        def get_next_tokens(self):
            return [self.next]

        def get_output(self, name):
            assert name == "logits"
            ids = np.asarray(self.last_prefill)
            return np.eye(97, dtype=np.float32)[(ids * 7 + 1) % 97][None]

    class GeneratorParams:
        def __init__(self, model):
            self.max_length = None

        def set_search_options(self, **kw):
            assert kw.get("do_sample") in (None, False)
            self.max_length = kw["max_length"]

    return types.SimpleNamespace(Config=Config, Model=lambda config: object(), GeneratorParams=GeneratorParams,
                                 Generator=Generator)


def test_genai_worker_speaks_the_benchmark_protocol(tmp_path, monkeypatch):
    """Registered in optimum_worker's table, answers ready/pass/quit, sets the rows' thread count,
    and decodes on past EOS (fed back) so every prompt gets max_new_tokens tokens."""
    seen: dict = {}
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", _fake_genai(seen))
    worker = _load("genai_worker")
    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "build.json").write_text(json.dumps({"matmulnbits": {"bits": 4, "block_size": 32, "accuracy_level": 4}}))
    # prompt 1: 1 -> 8 -> 57 -> 12 -> 85 -> 14 -> 2 (EOS: genai stops) -> 15 -> 9
    spec = {"backend": "genai", "prompts": [[5, 1], [4, 3]], "max_new_tokens": 8, "threads": 2,
            "genai_dir": str(folder)}
    out = io.StringIO()
    worker.optimum_worker.serve(spec, inp=io.StringIO("pass\nquit\n"), out=out)
    ready, passed, summary = [json.loads(x) for x in out.getvalue().splitlines()]
    assert ready["ready"] and summary["backend"] == "genai"
    assert seen["overlay"]["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2 and seen["cpu"]
    assert summary["info"]["intra_op_num_threads"] == 2 and summary["info"]["build"]["matmulnbits"]["bits"] == 4
    assert passed["tokens"][0] == [8, 57, 12, 85, 14, EOS, 15, 9]  # greedy without a stop: EOS is a token
    assert [len(x) for x in passed["tokens"]] == [8, 8]

    import numpy as np

    windows = np.array([[3, 4, 5], [6, 7, 8]])
    assert worker.teacher_forced_top1(folder, windows, 1).tolist() == ((windows * 7 + 1) % 97).tolist()


def test_genai_build_strips_a_null_quantization_config(tmp_path):
    worker = _load("genai_worker")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "quantization_config": None}))
    assert worker.strip_quantization_config(cfg) and "quantization_config" not in json.loads(cfg.read_text())
    cfg.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "awq"}}))
    assert not worker.strip_quantization_config(cfg)  # a real quantization stays


def test_genai_row_is_wired_into_the_benchmark(tmp_path):
    """Row h: skipped with how to set it up when the venv is absent; else a genai worker spec with
    the rows' prompts and threads; its worker script is registered; derive() and the report treat
    its greedy tokens like every other row's."""
    run = _load("run")
    rows_mod = sys.modules["benchmarks.rows"]  # as run.py imported it
    assert rows_mod.WORKERS is sys.modules["benchmarks.timing"].WORKERS  # the table timing.Worker picks scripts from
    assert rows_mod.WORKERS["genai"] == ROOT / "benchmarks" / "genai_worker.py"
    setup = rows_mod.Setup({"prompts": [[1, 2]], "max_new_tokens": 4, "threads": 2}, "/m", "x.gguf", tmp_path,
                           tmp_path / "onnx")
    missing = rows_mod.genai_row(setup, tmp_path / "nope" / "python", tmp_path / "genai-int4")
    (row,), specs = rows_mod.declare([missing])
    assert row["status"] == "skipped" and "setup_genai.sh" in row["reason"] and not specs
    python = tmp_path / "python"
    python.write_text("")
    (row,), specs = rows_mod.declare([rows_mod.genai_row(setup, python, tmp_path / "genai-int4")])
    py, spec = specs[row["row"]]
    assert row["row"].startswith("h: onnxruntime-genai") and row["kind"] == "full" and py == python
    assert spec["backend"] == "genai" and spec["threads"] == 2 and spec["prompts"] == [[1, 2]]
    assert spec["genai_dir"] == str(tmp_path / "genai-int4") and spec["gguf_file"] == "x.gguf"

    assert run.parse_args([]).genai_dir is None  # default: <work>/genai-int4
    measured = {"tokens_per_second_runs": [10.0, 12.0], "tokens_per_second": 11.0, "first_token_seconds": 0.1,
                "peak_rss_mb": 200.0, "rss_after_imports_mb": 40.0}
    rows = [{"row": "a: PyTorch generate", "kind": "full", "measured": {**measured, "tokens": [[1, 2, 3, 4]]}},
            {**row, "status": "ok", "measured": {**measured, "tokens": [[1, 2, 9, 9]],
                                                 "versions": {"onnxruntime-genai": "0.18.0"},
                                                 "info": {"build": {"matmulnbits": {"bits": 4, "block_size": 32,
                                                                                    "accuracy_level": 4,
                                                                                    "symmetric": True}}}}}]
    run.derive(rows, num_layers=30, oracle_layers=30.0, oracle_tf={})
    assert rows[1]["greedy_agreement"] == 0.5 and rows[1]["rouge_l"] == 0.5 and not rows[1]["identical_to_a"]
    note = _load("report").genai_note(rows[1]["measured"])
    assert "onnxruntime-genai 0.18.0" in note and "accuracy level 4, symmetric" in note


@pytest.mark.skipif(not GENAI_PYTHON.is_file(),
                    reason="benchmarks/.venv-genai is absent (bash benchmarks/setup_genai.sh makes it)")
def test_genai_builds_and_runs_a_tiny_model(tmp_path):
    """With the real venv: the builder makes an int4 graph of a tiny Llama, the worker decodes
    with it over the protocol, and genai's teacher-forced top-1 matches its own greedy step."""
    import subprocess

    import numpy as np
    from conftest import char_tokenizer, tiny_model

    model_dir = tmp_path / "hf"
    model = tiny_model("llama_hd16")
    model.config.bos_token_id = model.config.eos_token_id = 96  # the builder needs an EOS id (<unk> here)
    model.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    from benchmarks.timing import module_command, worker_env  # how the harness runs it: that venv has no project install

    worker = ROOT / "benchmarks" / "genai_worker.py"
    subprocess.run(module_command(GENAI_PYTHON, worker, "--build", tmp_path / "g", "--model-path", model_dir),
                   check=True, capture_output=True, timeout=300, env=worker_env(), cwd=tmp_path)
    facts = json.loads((tmp_path / "g" / "build.json").read_text())["matmulnbits"]
    assert facts == {"bits": 4, "block_size": 32, "accuracy_level": 4, "symmetric": True}  # the builder's CPU defaults
    spec = {"backend": "genai", "prompts": [[3, 4, 5, 6]], "max_new_tokens": 5, "threads": 1,
            "genai_dir": str(tmp_path / "g")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run(module_command(GENAI_PYTHON, worker, tmp_path / "spec.json"), input="pass\nquit\n",
                       capture_output=True, text=True, timeout=300, env=worker_env(), cwd=tmp_path)
    ready, passed, summary = [json.loads(x) for x in r.stdout.splitlines()]
    tokens = passed["tokens"][0]
    assert len(tokens) == 5 and summary["versions"]["onnxruntime-genai"]
    fid = _load("llamacpp_fidelity")
    windows = np.array([[3, 4, 5, 6] + tokens[:4]])
    top = fid.engine_top1("genai", GENAI_PYTHON, tmp_path / "g", windows, 1)
    assert top[0, 3:].tolist() == tokens  # teacher-forced on its own continuation = its greedy steps
