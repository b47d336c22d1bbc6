"""How faithful is each 4-bit model to the float one? llama.cpp's own Q4_1 run and
onnxruntime-genai's int4 build next to our int4 exports.

    python -m benchmarks.llamacpp_fidelity CKPT EXPORT [EXPORT ...] [--out DIR]
    python -m benchmarks.llamacpp_fidelity smollm2-135m [EXPORT ...] --engines genai llamacpp

On the checkpoint's held-out windows (drawn exactly as `lama train` drew them; given a recipe
name instead of a checkpoint, the windows `lama train` would draw with that recipe's training
settings: the same text, tokenizer, seq_len, held-out token count and seed), the float model's
top-1 word at every position (PyTorch, the dequantized GGUF) is compared with each engine's own
top-1 on the same windows, the true text as context, and with each quantized export's own
figure (its manifest's `teacher_forced_agreement_vs_fp32`, measured on its checkpoint's windows
at export time). Engines (`--engines`, default both; each in its own venv, skipped with the
reason when that venv is absent):

    llamacpp  llama-cpp-python in benchmarks/.venv-llamacpp, evaluating each window with all
              logits, on the GGUF file the model ships as; it multiplies Q4_1 weights by
              activations rounded to 8 bits (q8_1), so it too differs from the float model
    genai     onnxruntime-genai in benchmarks/.venv-genai, one prefill per window (genai returns
              the logits of every position), on its model builder's int4 graph (`--genai-dir`,
              built there first when missing: benchmarks/genai_worker.py)

Writes llamacpp_fidelity.json / .md (the windows' sha256 included, to match runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import write_report
from benchmarks.timing import module_command, worker_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
GENAI_PYTHON = HERE / ".venv-genai" / "bin" / "python"
ENGINES = ("llamacpp", "genai")

_LLAMA = """
import sys, numpy as np, llama_cpp
windows = np.load(sys.argv[2])
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=windows.shape[1] + 8, n_batch=windows.shape[1],
                      n_threads=int(sys.argv[4]), logits_all=True, verbose=False)
out = np.zeros(windows.shape, np.int64)
for i, w in enumerate(windows):
    llm.reset()
    llm.eval(w.tolist())
    out[i] = np.asarray(llm.scores[:len(w)]).argmax(-1)
np.save(sys.argv[3], out)
"""

_GENAI = """
import sys, numpy as np
from benchmarks import genai_worker  # the repository root is on PYTHONPATH (timing.worker_env)
np.save(sys.argv[3], genai_worker.teacher_forced_top1(sys.argv[1], np.load(sys.argv[2]), int(sys.argv[4])))
"""


def heldout_windows(source: str, data=None):
    """(held-out windows, checkpoint config or recipe, label): a checkpoint folder's own windows,
    or those `lama train` would draw with recipe `source` (name or file) and its training settings."""
    from exporter.backbone import load_backbone
    from exporter.checkpoint import Checkpoint
    from exporter.data import default_data_dir, make_splits, read_docs
    from exporter.recipes import load_recipe

    if (Path(source) / "lama.json").is_file():
        checkpoint = Checkpoint.open(source)
        bb = load_backbone(checkpoint.config.source)
        return bb, checkpoint.splits(bb.tokenizer, data)["heldout"].ids, checkpoint.config.source, f"checkpoint {source}"
    recipe = load_recipe(source)
    cfg = recipe.train
    bb = load_backbone(recipe.source)
    counts = {s: getattr(cfg, f"{s}_tokens") for s in ("train", "calib", "heldout")}
    splits = make_splits(read_docs(data or [default_data_dir()]), bb.tokenizer, cfg.seq_len, counts, seed=cfg.seed)
    return bb, splits["heldout"].ids, recipe.source, f"recipe {recipe.name} (the windows `lama train` draws)"


def engine_top1(engine: str, python: Path, model: Path, windows: np.ndarray, threads: int) -> np.ndarray:
    """An engine's top-1 word at every position of `windows`, run with that engine's venv."""
    script = {"llamacpp": _LLAMA, "genai": _GENAI}[engine]
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "w.npy", windows)
        subprocess.run([str(python), "-c", script, str(model), str(Path(tmp) / "w.npy"), str(Path(tmp) / "top.npy"),
                        str(threads)], check=True, env=worker_env())
        return np.load(Path(tmp) / "top.npy")


def ensure_genai(python: Path, folder: Path, model_path: str, gguf: str | None) -> Path:
    """The genai int4 build in `folder`, made there once (dequantize + model builder)."""
    if not (folder / "genai_config.json").is_file():
        cmd = module_command(python, HERE / "genai_worker.py", "--build", folder, "--model-path", model_path)
        subprocess.run(cmd + (["--gguf-file", gguf] if gguf else []), check=True, env=worker_env())
    return folder


def main(argv=None) -> int:
    import torch

    from exporter.fetch import resolve_local

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder, or a recipe name (models/*.json) for its default windows")
    p.add_argument("exports", nargs="*", type=Path)
    p.add_argument("--engines", nargs="*", choices=ENGINES, default=list(ENGINES),
                   help="engines to run (default: both; one whose venv is absent is skipped with the reason)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llamacpp-python", type=Path, default=LLAMACPP_PYTHON)
    p.add_argument("--genai-python", type=Path, default=GENAI_PYTHON)
    p.add_argument("--genai-dir", type=Path,
                   help="the genai int4 build (default: runs/bench/<recipe>/genai-int4, or genai-int4 beside the "
                        "checkpoint; built there when missing)")
    p.add_argument("--out", type=Path, default=Path("runs") / "llamacpp_fidelity")
    a = p.parse_args(argv)
    bb, windows, source, drawn = heldout_windows(a.checkpoint)
    with torch.no_grad():
        ref = np.concatenate([bb.model(torch.from_numpy(windows[i:i + 8])).logits.argmax(-1).numpy()
                              for i in range(0, len(windows), 8)])
    del bb
    folder, name = resolve_local(source)
    rows, skipped = [], {}
    for engine in a.engines:
        python = a.llamacpp_python if engine == "llamacpp" else a.genai_python
        if not python.is_file():
            skipped[engine] = f"{python} not found: run `bash benchmarks/setup_{engine}.sh`"
            continue
        if engine == "llamacpp":
            if not name:
                skipped[engine] = "the model does not come from a GGUF file; llama.cpp has nothing to run"
                continue
            model, label = Path(folder) / name, f"llama.cpp {name}"
        else:
            default = (Path(a.checkpoint).resolve().parent if Path(a.checkpoint, "lama.json").is_file()
                       else ROOT / "runs" / "bench" / a.checkpoint) / "genai-int4"
            model = ensure_genai(a.genai_python, a.genai_dir or default, folder, name)
            facts = json.loads((model / "build.json").read_text()) if (model / "build.json").is_file() else {}
            q = facts.get("matmulnbits") or {}
            sym = {True: "symmetric, ", False: "asymmetric, "}.get(q.get("symmetric"), "")
            origin = "; re-quantized from the dequantized GGUF" if name else ""
            label = (f"onnxruntime-genai model builder int4 (MatMulNBits {q.get('bits', '?')}-bit, {sym}blocks of "
                     f"{q.get('block_size', '?')}, accuracy level {q.get('accuracy_level', '?')}{origin})")
        top = engine_top1(engine, python, model, windows, a.threads)
        rows.append({"model": label, "engine": engine, "agreement_vs_fp32": float((top == ref).mean())})
    for e in a.exports:
        q = json.loads((e / "manifest.json").read_text()).get("quantization") or {}
        cal = q.get("calibration", {})
        rows.append({"model": f"{e.name} ({q.get('method', 'fp32')}; exact blocks {q.get('exact_blocks')})",
                     "agreement_vs_fp32": cal.get("teacher_forced_agreement_vs_fp32"),
                     "tokens": cal.get("teacher_forced_tokens")})
    digest = hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()
    res = {"checkpoint": str(a.checkpoint), "windows": drawn, "heldout_tokens": int(windows.size),
           "heldout_sha256": digest, "threads": a.threads, "rows": rows, "skipped": skipped}
    md = [f"# Top-1 agreement with the float model on {windows.size} held-out tokens (teacher-forced)", "",
          f"Windows: {drawn}; sha256 {digest[:16]}.", "",
          "| model | agreement with fp32 |", "|---|---:|"]
    md += [f"| {r['model']} | {r['agreement_vs_fp32']:.3f} |" for r in rows if r["agreement_vs_fp32"] is not None]
    md += [""] + [f"- {k} skipped: {v}" for k, v in skipped.items()] if skipped else []
    write_report(a.out, "llamacpp_fidelity", res, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
