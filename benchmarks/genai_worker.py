"""onnxruntime-genai's greedy generation for the benchmark's genai row (JSON lines on stdout), and
the model build it runs on.

    benchmarks/.venv-genai/bin/python -m benchmarks.genai_worker SPEC.json    # then "pass" ..., "quit"
    benchmarks/.venv-genai/bin/python -m benchmarks.genai_worker --build OUT [--model smollm2-135m]

(from the repository root, or anywhere with the root on PYTHONPATH, as the harness runs it; that
venv has no project install and needs none: a build from a recipe name reads exporter.recipes and
exporter.fetch, standard library only, from the checkout)

onnxruntime-genai (Microsoft's generation loop over onnxruntime, with its own model builder) is
the other way to run a Hugging Face model as int4 ONNX on a CPU. Its builder
(`python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu`) writes one
graph for the whole model (GroupQueryAttention, MatMulNBits, fused norms) plus genai_config.json;
it runs through benchmarks/genai_build.py, the same CLI with a shim for Gemma 3's transformers-5
RoPE config (other models build unchanged).
It reads transformers folders only, so a GGUF model is first dequantized into OUT-hf (transformers
5, `GgufConfig(dequantize=True)`, then `quantization_config: null` removed from config.json, which
the builder refuses). Needs benchmarks/.venv-genai (setup_genai.sh).

The worker speaks exactly the protocol of optimum_worker.py (it reuses its `serve`), so
benchmarks/run.py drives it like every other row: the same prompts as token ids, greedy, the same
thread count (onnxruntime's intra-op threads, set in the genai config), no end-of-sequence stop,
the same clock points (the call, the first new token, the return).

SPEC (JSON): backend "genai", prompts (token ids), max_new_tokens, threads, genai_dir (the built
model; built there first when it has no genai_config.json) and, for that build, model_path
[+ gguf_file] (the model as shipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import optimum_worker  # the shared protocol: serve, versions, memory

PRECISION = "int4"  # the builder's precision; its other choices stay at the builder's defaults


def dequantize(model_path: str, gguf_file: str, out: Path) -> Path:
    """A transformers folder holding the GGUF model as float weights (what the builder reads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file).save_pretrained(out)
    strip_quantization_config(out / "config.json")
    return out


def strip_quantization_config(path: Path) -> bool:
    """Remove a `quantization_config` entry that is null or empty (the builder reads any such key
    as a quantized checkpoint and fails). True when one was removed."""
    cfg = json.loads(path.read_text())
    if "quantization_config" in cfg and not cfg["quantization_config"]:
        del cfg["quantization_config"]
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        return True
    return False


def build(model_path: str, gguf_file: str | None, out: Path, precision: str = PRECISION,
          extra_options: list[str] | None = None) -> Path:
    """Run onnxruntime-genai's model builder once (CPU, `precision`, its defaults unless
    `extra_options`, KEY=VALUE strings such as is_symmetric=false), into `out`."""
    out = Path(out)
    if (out / "genai_config.json").is_file():
        return out
    src = Path(model_path)
    if gguf_file:
        src = dequantize(model_path, gguf_file, out.with_name(out.name + "-hf"))
    t0 = time.perf_counter()
    # the builder's own CLI, through benchmarks/genai_build.py's shim (Gemma 3's transformers-5 RoPE)
    cmd = [sys.executable, "-m", "benchmarks.genai_build", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + "-cache"))]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    root = str(Path(__file__).resolve().parents[1])  # where `benchmarks` imports from, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + ([os.environ["PYTHONPATH"]]
                                                                  if os.environ.get("PYTHONPATH") else []))}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"model builder failed (rc={r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
    record = {"command": cmd[1:], "source": str(src), "precision": precision,
              "seconds": round(time.perf_counter() - t0, 1), **graph_facts(out / "model.onnx")}
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def graph_facts(path: Path) -> dict:
    """Operator counts and the MatMulNBits settings the builder chose (its defaults)."""
    from collections import Counter

    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute} if nbits else {}
    facts = {k: attrs[k] for k in ("bits", "block_size", "accuracy_level") if k in attrs}
    if nbits:  # MatMulNBits' 4th input: the zero points of an asymmetric quantization
        facts["symmetric"] = not (len(nbits[0].input) > 3 and nbits[0].input[3])
    return {"ops": dict(Counter(n.op_type for n in g.node).most_common()), "matmulnbits": facts}


def overlay(threads: int) -> dict:
    """What the worker changes in genai_config.json: onnxruntime's intra-op threads, the other rows'
    count (onnxruntime's other session settings stay at their defaults, as for optimum's row)."""
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}


def max_length(cfg: dict, needed: int) -> int:
    """The generator's max_length for `needed` positions: at least the sliding window of a model
    built with windowed KV caches (genai_config.json's model.decoder.sliding_window; Gemma 3: 512).
    onnxruntime-genai 0.18 sizes those layers' caches min(max_length, window) and onnxruntime 1.32's
    GroupQueryAttention (sliding_window_cache=1) refuses one smaller than the window ("KV cache
    capacity (22) must be at least local_window_size (512)"). The tokens are the same: decoding
    stops after the row's n tokens whatever max_length is. Other models: `needed` unchanged."""
    window = ((cfg.get("model") or {}).get("decoder") or {}).get("sliding_window") or {}
    return max(needed, int(window.get("window_size") or 0))


def greedy(generator, n: int, clock=time.perf_counter) -> tuple[list[int], float | None]:
    """n greedy tokens from a generator that holds the prompt; (tokens, time of the first).

    genai ends a sequence at its end-of-sequence token whatever the config says (an empty or
    different `eos_token_id` does not stop it), without feeding that token to the model. Every row
    decodes the same number of steps, so the token is fed back (`append_tokens`) and decoding goes
    on: the same tokens as greedy decoding without a stop (checked against the graph run by
    onnxruntime on the whole sequence)."""
    tokens: list[int] = []
    first = None
    while len(tokens) < n:
        if generator.is_done():
            if not tokens:
                raise RuntimeError("the generator is done before its first token")
            generator.append_tokens([[tokens[-1]]])
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if first is None:
            first = clock()
    return tokens, first


def _load_genai(spec: dict):
    import onnxruntime_genai as og

    folder = Path(spec["genai_dir"])
    if not (folder / "genai_config.json").is_file():
        build(spec["model_path"], spec.get("gguf_file"), folder)
    threads = spec["threads"]
    config = og.Config(str(folder))
    config.clear_providers()  # CPU
    config.overlay(json.dumps(overlay(threads)))
    model = og.Model(config)
    n = spec["max_new_tokens"]
    cfg = json.loads((folder / "genai_config.json").read_text())

    def run(ids: list[int]):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length(cfg, len(ids) + n), min_length=0,
                                  num_beams=1)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens([ids])  # the prompt's prefill
        tokens, first = greedy(gen, n)
        t_end = time.perf_counter()
        del gen
        return tokens, t0, first or t_end, t_end, {}

    info = {"genai_dir": str(folder), "precision": PRECISION, "intra_op_num_threads": threads,
            "onnx_files": sorted(p.name for p in folder.glob("*.onnx")),
            "onnx_mb": round(sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith((".onnx", ".data")))
                             / 2**20, 1),
            "genai_config_session_options": cfg.get("model", {}).get("decoder", {}).get("session_options")}
    if (folder / "build.json").is_file():
        info["build"] = json.loads((folder / "build.json").read_text())
    return run, info


def teacher_forced_top1(folder: str | Path, windows, threads: int):
    """genai's own top-1 word at every position of each window (the true text as context): one
    prefill per window, whose logits genai returns for every position. (n, seq_len) int64."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps(overlay(threads)))
    model = og.Model(config)
    windows = np.asarray(windows)
    out = np.zeros(windows.shape, np.int64)
    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    for i, w in enumerate(windows):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length(cfg, windows.shape[1] + 1))
        gen = og.Generator(model, params)
        gen.append_tokens([w.tolist()])
        logits = np.asarray(gen.get_output("logits"))
        if logits.size % len(w):
            raise RuntimeError(f"genai returned logits of shape {logits.shape} for a {len(w)}-token window")
        out[i] = logits.reshape(len(w), -1).argmax(-1)
        del gen
    return out


optimum_worker.BACKENDS["genai"] = (_load_genai, ["onnxruntime-genai", "onnxruntime", "numpy"])


def _build_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build the genai row's model (onnxruntime-genai's builder, int4, CPU)")
    p.add_argument("--build", type=Path, required=True, metavar="OUT", help="folder for the built model")
    p.add_argument("--model", default="smollm2-135m", help="recipe name in models/ (default smollm2-135m)")
    p.add_argument("--model-path", help="instead of --model: the model's local folder (as shipped)")
    p.add_argument("--gguf-file", help="with --model-path: the GGUF file in it")
    p.add_argument("--extra-options", nargs="+", metavar="KEY=VALUE",
                   help="the builder's --extra_options (default: none, its defaults), e.g. is_symmetric=false")
    a = p.parse_args(argv)
    if a.model_path:
        path, gguf = a.model_path, a.gguf_file
    else:
        from exporter.fetch import resolve_local  # (standard library only, like exporter.recipes)
        from exporter.recipes import load_recipe

        path, gguf = resolve_local(load_recipe(a.model).source)
    out = build(path, gguf, a.build, extra_options=a.extra_options)
    print(json.dumps({"built": str(out), **json.loads((out / "build.json").read_text())}
                     if (out / "build.json").is_file() else {"built": str(out)}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--build"):
        sys.exit(_build_main(sys.argv[1:]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime_genai  # noqa: F401  (before serve() reads the "after imports" RSS, like the other rows)

    sys.exit(optimum_worker.main())
