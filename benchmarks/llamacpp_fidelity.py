"""How faithful is each 4-bit model to the float one? llama.cpp's own Q4_1 run next to our int4 exports.

    python benchmarks/llamacpp_fidelity.py CKPT EXPORT [EXPORT ...] [--out DIR]

On the checkpoint's held-out windows (drawn exactly as `lama train` drew them), the float model's
top-1 word at every position (PyTorch, the dequantized GGUF) is compared with llama.cpp's top-1
on the same windows (llama-cpp-python in benchmarks/.venv-llamacpp, evaluating each window
with all logits, the GGUF file the model ships as) and with each quantized export's own
figure (its manifest's `teacher_forced_agreement_vs_fp32`, measured on the same windows at
export time). llama.cpp multiplies Q4_1 weights by activations rounded to 8 bits (q8_1),
so it too differs from the float model. Writes llamacpp_fidelity.json / .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
from report import write_report  # noqa: E402 (beside this script)

LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"

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


def main(argv=None) -> int:
    import torch

    from exporter.backbone import load_backbone
    from exporter.checkpoint import Checkpoint
    from exporter.fetch import resolve_local

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("exports", nargs="*", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llamacpp-python", type=Path, default=LLAMACPP_PYTHON)
    p.add_argument("--out", type=Path, default=Path("runs") / "llamacpp_fidelity")
    a = p.parse_args(argv)
    checkpoint = Checkpoint.open(a.checkpoint)
    config = checkpoint.config
    if not config.source.gguf_file:
        raise SystemExit(f"{a.checkpoint}: the model does not come from a GGUF file; llama.cpp has nothing to run")
    bb = load_backbone(config.source)
    windows = checkpoint.splits(bb.tokenizer)["heldout"].ids
    with torch.no_grad():
        ref = np.concatenate([bb.model(torch.from_numpy(windows[i:i + 8])).logits.argmax(-1).numpy()
                              for i in range(0, len(windows), 8)])
    folder, name = resolve_local(config.source)
    gguf = Path(folder) / name
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "w.npy", windows)
        subprocess.run([str(a.llamacpp_python), "-c", _LLAMA, str(gguf), str(Path(tmp) / "w.npy"),
                        str(Path(tmp) / "top.npy"), str(a.threads)], check=True)
        top = np.load(Path(tmp) / "top.npy")
    rows = [{"model": f"llama.cpp {gguf.name}", "agreement_vs_fp32": float((top == ref).mean())}]
    for e in a.exports:
        q = json.loads((e / "manifest.json").read_text()).get("quantization") or {}
        cal = q.get("calibration", {})
        rows.append({"model": f"{e.name} ({q.get('method', 'fp32')}; exact blocks {q.get('exact_blocks')})",
                     "agreement_vs_fp32": cal.get("teacher_forced_agreement_vs_fp32"),
                     "tokens": cal.get("teacher_forced_tokens")})
    res = {"checkpoint": str(a.checkpoint), "heldout_tokens": int(windows.size), "rows": rows}
    md = [f"# Top-1 agreement with the float model on {windows.size} held-out tokens (teacher-forced)", "",
          "| model | agreement with fp32 |", "|---|---:|"]
    md += [f"| {r['model']} | {r['agreement_vs_fp32']:.3f} |" for r in rows if r["agreement_vs_fp32"] is not None]
    write_report(a.out, "llamacpp_fidelity", res, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
