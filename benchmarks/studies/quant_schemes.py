"""Which int4/int8 scheme to export with: agreement with fp32 per scheme, and MatMulNBits speed.

    python -m benchmarks.studies.quant_schemes --model smollm2-135m [--tokens 2048] [--threads 2]

For each scheme (bits, symmetric or not, accuracy level 0 or 4; blocks of 32) this quantizes the
model's weights with onnxruntime's own block quantizer, runs the model in PyTorch with exactly the
numerics of the MatMulNBits graphs (exporter/quantize.fake_quantize, equal to onnxruntime's
logits to ~1e-5) on held-out text, and reports the top-1 agreement with the fp32 model and the
perplexity. It then times onnxruntime's MatMulNBits kernel at one token (M=1) for the model's
projection shapes at each accuracy level, next to a float MatMul. Writes quant_schemes.json/.md.
Kernel times on shared cores are indications only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = [(4, False, 0), (4, False, 4), (4, True, 0), (4, True, 4), (8, True, 0), (8, True, 4), (8, False, 4)]


def agreement(bb, windows: np.ndarray, scheme) -> dict:
    import torch

    from exporter.quantize import fake_quantize

    if scheme is None:
        model = bb.model
    else:
        model = copy.deepcopy(bb.model)
        fake_quantize([model], scheme)
    tops, nll = [], []
    with torch.no_grad():
        for s in range(0, len(windows), 4):
            ids = torch.from_numpy(windows[s:s + 4])
            logits = model(ids).logits.float()
            tops.append(logits.argmax(-1))
            logp = torch.log_softmax(logits[:, :-1], -1)
            nll.append(-logp.gather(-1, ids[:, 1:, None]).squeeze(-1))
    return {"top1": torch.cat(tops), "ppl": float(torch.exp(torch.cat(nll).mean()))}


def kernel_ms(k: int, n: int, scheme, threads: int, calls: int = 200) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporter.quantize import quantize_graph

    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32) * 0.05
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [numpy_helper.from_array(w, "W")])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        if scheme is not None:
            quantize_graph(path, scheme)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    x = {"x": np.random.default_rng(1).normal(size=(1, k)).astype(np.float32)}
    for _ in range(20):
        sess.run(None, x)
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, x)
        best.append((time.perf_counter() - t0) / calls * 1e3)
    return min(best)


def main(argv: list[str] | None = None) -> int:
    import torch

    from exporter.api import resolve_recipe
    from exporter.backbone import load_backbone
    from exporter.data import default_data_dir, make_splits, read_texts
    from exporter.quantize import Scheme

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored per scheme")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = resolve_recipe(a.model)
    bb = load_backbone(recipe.source)
    cfg = recipe.train
    splits = make_splits(read_texts(a.data or [default_data_dir()]), bb.tokenizer, cfg.seq_len,
                         {"train": cfg.train_tokens, "calib": cfg.calib_tokens, "heldout": a.tokens}, seed=cfg.seed)
    windows = splits["heldout"].ids
    ref = agreement(bb, windows, None)
    rows = [{"scheme": "fp32", "agreement": 1.0, "perplexity": ref["ppl"]}]
    for bits, sym, level in SCHEMES:
        s = Scheme(bits, 32, sym, level)
        r = agreement(bb, windows, s)
        rows.append({"scheme": f"int{bits} {'sym' if sym else 'asym'} acc{level}", "bits": bits, "symmetric": sym,
                     "accuracy_level": level, "agreement": float((r["top1"] == ref["top1"]).float().mean()),
                     "perplexity": r["ppl"]})
        print(rows[-1], file=sys.stderr, flush=True)
    shape = bb.shape
    inter = bb.model.config.intermediate_size
    shapes = {"q/o (D x D)": (shape.hidden_size, shape.hidden_size), "up/gate (D x I)": (shape.hidden_size, inter),
              "down (I x D)": (inter, shape.hidden_size), "LM head (D x V)": (shape.hidden_size, shape.vocab_size)}
    kernels = {}
    for name, (k, n) in shapes.items():
        kernels[name] = {"fp32 MatMul": kernel_ms(k, n, None, a.threads)}
        for bits, sym, level in [(4, False, 0), (4, False, 4), (8, True, 0), (8, True, 4)]:
            kernels[name][f"int{bits} acc{level}"] = kernel_ms(k, n, Scheme(bits, 32, sym, level), a.threads)
        print(name, kernels[name], file=sys.stderr, flush=True)
    res = {"model": a.model, "heldout_tokens": int(windows.size), "threads": a.threads, "schemes": rows,
           "kernel_ms_at_one_token": kernels, "load_average": list(os.getloadavg())}
    out = a.out / a.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_schemes.json").write_text(json.dumps(res, indent=1))
    cols = list(next(iter(kernels.values())))
    md = [f"# Quantization schemes: {a.model}", "",
          f"Top-1 agreement with the fp32 model on {res['heldout_tokens']} held-out tokens (teacher-forced), "
          "PyTorch with MatMulNBits' exact numerics; blocks of 32.", "",
          "| scheme | agreement with fp32 | perplexity |", "|---|---:|---:|"]
    md += [f"| {r['scheme']} | {r['agreement']:.4f} | {r['perplexity']:.3f} |" for r in rows]
    md += ["", f"onnxruntime kernel ms at one token, {a.threads} thread(s), best of 5 x 200 calls "
               f"(load average {res['load_average'][0]:.1f}: shared cores, indications only):", "",
           "| weight | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    md += [f"| {n} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for n, v in kernels.items()]
    (out / "quant_schemes.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
