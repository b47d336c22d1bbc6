"""Time greedy generation for one benchmark row in a process of its own (JSON lines on stdout).

    python -m benchmarks.optimum_worker SPEC.json   # then, on stdin: "pass" (any number of times), "quit"

Named for its main job: it is what `benchmarks/run.py` runs with the python of
`benchmarks/.venv-optimum` (transformers 4.57 + optimum-onnx, see setup_optimum.sh) for the
optimum/onnxruntime baseline. The same file also times the other rows, so every row is
measured by the same code in a fresh process:

    backend "torch"    transformers `generate` in PyTorch (greedy, use_cache)   main venv
    backend "optimum"  optimum's ORTModelForCausalLM.generate on a whole-model     optimum venv
                       ONNX export (`optimum-cli export onnx --task
                       text-generation-with-past`, done once, then reused)
    backend "lama"     this project's Runtime on the per-segment export            main venv

It imports only the standard library at the top, so it starts under either venv. The harness
(timing.Worker) runs it as a module with the repository root on PYTHONPATH, which is also where
the lama backend's `runtime` comes from: the checkout's, whatever the venv has installed.

SPEC (JSON): backend, prompts (lists of token ids), max_new_tokens, threads, and per backend:
model_path [+ gguf_file] (torch), model_path [+ gguf_file] + onnx_dir (optimum),
export_dir + thresholds [+ kv_policy, exact, max_pending] (lama).

Protocol: after loading and one warm-up generation (not counted) the worker prints
{"ready": ...}. Each "pass" line runs every prompt once and prints that pass: decode
tokens/s = tokens after the first / wall time after the first, summed over the prompts;
first-token latency = median over the prompts (prefill + first token); the tokens. Wall clock
is taken at the call, when the first new token is available (a streamer callback for
transformers/optimum, the first streamed record for the runtime) and at return. "quit" prints
the process summary and exits. Memory: the process's peak resident set (VmHWM from
/proc/self/status, which a fresh exec starts from zero, unlike ru_maxrss, which may carry the
parent's peak across vfork+exec) and its resident set after imports, before the model loaded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status_kb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource  # not Linux: the best we have (may include a parent's peak)

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _versions(names: list[str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


# -- backends: each returns a function ids -> (tokens, t_first, t_end, extra) ---------------------
class _Clock:
    """A transformers streamer that notes when the first new token arrives.

    generate() calls put() once with the prompt, then once per new token."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def _hf_generate(model, n: int):
    import torch
    from transformers import GenerationConfig

    # No end-of-sequence stop: every row decodes the same n steps (the runtime: stop_at_eos=False).
    # generate() fills unset fields from the model's own config, so clear EOS there, not only here.
    for c in (model.generation_config, model.config):
        c.eos_token_id = None
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False, num_beams=1, use_cache=True,
                           eos_token_id=None, pad_token_id=0)

    def run(ids: list[int]):
        x = torch.tensor([ids], dtype=torch.long)
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                 streamer=clock)
        t_end = time.perf_counter()
        tokens = out[0, len(ids):].tolist()
        return tokens, t0, (clock.first or t_end), t_end, {}

    return run


def _load_torch(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    kw = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {}
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, **kw).eval()
    info = {"attn_implementation": getattr(model.config, "_attn_implementation", None),
            "torch_threads": torch.get_num_threads()}
    return _hf_generate(model, spec["max_new_tokens"]), info


def _export_optimum(spec: dict) -> Path:
    """Export the whole model once with optimum-cli (from a local folder; GGUF is saved first)."""
    onnx_dir = Path(spec["onnx_dir"])
    if (onnx_dir / "model.onnx").is_file():
        return onnx_dir
    src = spec["model_path"]
    if spec.get("gguf_file"):  # optimum-cli reads transformers folders: dequantize the GGUF into one
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = str(onnx_dir.with_name(onnx_dir.name + "-hf"))
        AutoModelForCausalLM.from_pretrained(spec["model_path"], gguf_file=spec["gguf_file"]).save_pretrained(src)
        AutoTokenizer.from_pretrained(spec["model_path"], gguf_file=spec["gguf_file"]).save_pretrained(src)
    cli = Path(sys.executable).with_name("optimum-cli")
    t0 = time.perf_counter()
    r = subprocess.run([str(cli), "export", "onnx", "--model", src, "--task", "text-generation-with-past",
                        str(onnx_dir)], capture_output=True, text=True)
    if r.returncode != 0 or not (onnx_dir / "model.onnx").is_file():
        raise RuntimeError(f"optimum-cli export failed (rc={r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
    (onnx_dir / "export_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return onnx_dir


def _load_optimum(spec: dict):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(spec["threads"])
    onnx_dir = _export_optimum(spec)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec["threads"]  # everything else: onnxruntime's defaults
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider", session_options=opts,
                                                use_cache=True)
    info = {"onnx_files": sorted(p.name for p in onnx_dir.glob("*.onnx")),
            "providers": model.model.get_providers() if hasattr(model, "model") else None}
    secs = onnx_dir / "export_seconds.txt"
    if secs.is_file():
        info["export_seconds"] = float(secs.read_text())
    return _hf_generate(model, spec["max_new_tokens"]), info


def _load_lama(spec: dict):
    from runtime import Runtime

    rt = Runtime.load(spec["export_dir"], threads=spec["threads"], kv_policy=spec.get("kv_policy", "defer"),
                      max_pending=spec.get("max_pending"), thread_pool=spec.get("thread_pool", "session"))
    th = spec.get("thresholds")  # "never", a target (manifest by_target) or a list (None = never)
    n = spec["max_new_tokens"]
    exact = bool(spec.get("exact"))
    resolved = rt.resolve_thresholds(th)
    # exact mode drafts with every source unless the spec says otherwise ("none": one token per call)
    drafting = {k: spec[k] for k in ("drafts", "draft_tokens", "draft_cost") if exact and k in spec}

    def run(ids: list[int]):
        t0 = time.perf_counter()
        first = None
        records = []
        for rec in rt.stream(ids, n, thresholds=th, stop_at_eos=False, exact=exact, **drafting):
            if first is None:
                first = time.perf_counter()
            records.append(rec)
        t_end = time.perf_counter()
        layers = rt.manifest.model.num_layers
        # the runtime's own per-token clock (model steps only, no detokenization) and work counters
        return ([r.token for r in records], t0, first or t_end, t_end,
                {"layers": [r.exit_layer for r in records], "step_seconds": [r.seconds for r in records],
                 "layer_positions": sum(r.layer_positions for r in records),
                 "step_layer_positions": [r.layer_positions for r in records], "num_layers": layers,
                 "plain_layer_positions": (len(ids) + len(records) - 1) * layers,
                 "fill_positions": sum(r.fill_positions for r in records),
                 "calls": sum(r.calls for r in records), "owed": records[-1].owed_layer_positions if records else 0,
                 "rollbacks": sum(r.rollbacks for r in records)})

    from runtime.manifest import to_json_thresholds

    info = {"thresholds": to_json_thresholds(resolved), "kv_policy": rt.kv_policy,
            "exact": exact, "max_pending": rt.max_pending,
            "num_segments": len(rt.manifest.segments), "num_layers": rt.manifest.model.num_layers}
    return run, info


BACKENDS = {"torch": (_load_torch, ["torch", "transformers", "numpy"]),
            "optimum": (_load_optimum, ["torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "numpy"]),
            "lama": (_load_lama, ["onnxruntime", "numpy", "tokenizers"])}


def serve(spec: dict, inp=sys.stdin, out=sys.stdout) -> None:
    """Load, warm up, answer `ready`; then one timed pass over all prompts per `pass` line on
    stdin, and the process summary (memory, versions) on `quit`. One JSON line per answer.

    The caller keeps every row's worker alive and interleaves their passes, so a burst of load
    from other jobs on shared cores hits all rows alike instead of whichever row ran then."""
    if spec["backend"] in ("torch", "optimum"):  # heavy imports before the baseline RSS, so it is "after imports"
        import torch  # noqa: F401
        import transformers  # noqa: F401
    elif spec["backend"] == "lama":
        import onnxruntime  # noqa: F401
    rss_imports_kb = _status_kb("VmRSS")
    if spec["backend"] not in BACKENDS:
        raise SystemExit(f"unknown backend {spec['backend']!r}; this worker knows {sorted(BACKENDS)}")
    load, packages = BACKENDS[spec["backend"]]
    t0 = time.perf_counter()
    run, info = load(spec)
    load_s = time.perf_counter() - t0
    prompts = spec["prompts"]
    run(prompts[0])  # warm-up, not counted

    def say(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"ready": True, "load_seconds": load_s})
    for line in inp:
        cmd = line.strip()
        if cmd == "pass":
            gens = [run(p) for p in prompts]
            decode_tokens = sum(len(g[0]) - 1 for g in gens)
            decode_s = sum(g[3] - g[2] for g in gens)
            say({"tokens_per_second": decode_tokens / decode_s if decode_s > 0 else float("nan"),
                 "first_token_seconds": statistics.median(g[2] - g[1] for g in gens),
                 "total_seconds": sum(g[3] - g[1] for g in gens),
                 "tokens": [g[0] for g in gens], "extra": [g[4] for g in gens]})
        elif cmd == "quit":
            say({"backend": spec["backend"], "load_seconds": load_s, "rss_after_imports_mb": rss_imports_kb / 1024,
                 "peak_rss_mb": _status_kb("VmHWM") / 1024, "versions": _versions(packages), "info": info})
            return
        elif cmd:
            say({"error": f"unknown command {cmd!r}; use pass or quit"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
