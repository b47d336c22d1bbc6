"""Time llama.cpp's greedy generation for the benchmark's llama.cpp row (JSON lines on stdout).

    benchmarks/.venv-llamacpp/bin/python -m benchmarks.llamacpp_worker SPEC.json   # then "pass" ..., "quit"

(from the repository root, or anywhere with the root on PYTHONPATH, as the harness runs it; that
venv has no project install and needs none: the worker imports only optimum_worker from here)

llama.cpp (through `llama-cpp-python`, built by setup_llamacpp.sh) is what people run a small
model with on a CPU or a Jetson: it is the baseline an early-exit runtime has to beat. This
worker speaks exactly the protocol of optimum_worker.py (it reuses its `serve`), so
benchmarks/run.py drives it like every other row: same prompts as token ids, greedy, the same
thread count, no end-of-sequence stop, the same clock points (the call, the first new token,
the return).

SPEC (JSON): backend "llamacpp", prompts (token ids), max_new_tokens, threads, gguf_path (the
same Q4_1 GGUF file that exporter/fetch.py fetches and our exports are made from).

Greedy here is llama.cpp's own greedy sampler (temp 0, no repetition penalty); the prompt's
token ids go in as they are (no BOS added), and the KV cache is cleared before every prompt
so that no pass reuses an earlier pass's prefill.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import llama_cpp  # (imported before serve() reads the "after imports" RSS, like the other rows)

from benchmarks import optimum_worker  # the shared protocol: serve, versions, memory


def _load_llamacpp(spec: dict):
    path = Path(spec["gguf_path"])
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    n = spec["max_new_tokens"]
    longest = max(len(p) for p in spec["prompts"]) + n
    threads = spec["threads"]
    draft = None
    if spec.get("prompt_lookup"):  # llama.cpp's own prompt-lookup decoding: n-gram drafts verified in a batch
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=int(spec["prompt_lookup"]))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, longest + 8), n_batch=512, n_threads=threads,
                n_threads_batch=threads, seed=0, verbose=False, draft_model=draft)

    def run(ids: list[int]):
        llm.reset()  # n_tokens = 0: eval() then drops every cached position (no prefix reuse across passes)
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = None
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) == n:  # no EOS stop: every row decodes the same n steps
                break
        t_end = time.perf_counter()
        return tokens, t0, first or t_end, t_end, {}

    info = {"gguf_file": path.name, "n_threads": threads, "n_ctx": llm.n_ctx(),
            "system_info": _system_info()}
    return run, info


def _system_info() -> str:
    try:
        return llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # informative only
        return ""


optimum_worker.BACKENDS["llamacpp"] = (_load_llamacpp, ["llama-cpp-python", "numpy"])

if __name__ == "__main__":
    sys.exit(optimum_worker.main())
