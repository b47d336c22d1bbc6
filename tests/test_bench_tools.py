"""benchmarks/profile_chain.py on a tiny export, and the llama.cpp worker's protocol wiring."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import make_checkpoint

from exporter import api

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_profile_chain_splits_each_token(tmp_path, precision="int4"):
    ckpt, bb = make_checkpoint(tmp_path, "llama")
    folder = api.export(ckpt, out=tmp_path / "onnx", precision=precision, backbone=bb)
    prof = _load("profile_chain")
    p = prof.profile(folder, "It is a truth", 6, "never", 1, tmp_path / "prof")
    t = p["totals"]
    assert p["decode_tokens"] == 5 and p["precision"] == precision
    assert t["run_calls_per_token"] == len(p["segments"]) == 4  # exits off: every segment, once per token
    parts = t["kernels_ms"] + t["ort_executor_ms"] + t["binding_ms"] + t["kv_cache_ms"] + t["python_glue_ms"]
    assert parts == pytest.approx(t["token_ms"], rel=1e-6)
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
