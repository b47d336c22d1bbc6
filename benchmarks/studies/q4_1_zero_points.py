"""Can Q4_1 blocks run without their float offset product? Fidelity of integer zero points.

    python -m benchmarks.studies.q4_1_zero_points [--tokens 2048] [--out DIR]

The exact int4 export multiplies each Q4_1 weight `w = d*q + m` as a 4-bit `d*(q-8)` plus a float
product `blocksum(x) @ (m + 8d)` (exporter/gguf_blocks.py): the offset nodes cost ~1.3x in decode
speed against a re-quantized graph (benchmarks/results/smollm2-135m/requant-vs-genai,
full-path-vs-genai). MatMulNBits' fast path takes integer zero points only, so the cheap
alternative keeps d and q and rounds the offset to one: `w' = d*(q - z)`, z = round(-m/d) in
[0, 15], shifting every weight of a block by the same |m + d*z| <= d/2. This scores that model
(and the exact twin, for reference) teacher-forced against the float model on held-out windows,
both with accuracy level 4's int8 activations, in PyTorch (exporter.gguf_blocks.exact_twin and
the same activation rounding).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report


def main(argv=None) -> int:
    import torch

    from exporter.api import resolve_recipe
    from exporter.backbone import load_backbone
    from exporter.data import default_data_dir, make_splits, read_texts
    from exporter.gguf_blocks import BLOCK, exact_twin, q4_1_blocks
    from exporter.int8_activations import int8_activations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = resolve_recipe(a.model)
    bb = load_backbone(recipe.source)
    cfg = recipe.train
    windows = make_splits(read_texts([default_data_dir()]), bb.tokenizer, cfg.seq_len,
                          {"train": cfg.train_tokens, "calib": cfg.calib_tokens, "heldout": a.tokens},
                          seed=cfg.seed)["heldout"].ids

    def top1(model):
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(windows[s:s + 4])).logits.argmax(-1)
                              for s in range(0, len(windows), 4)])

    ref = top1(bb.model)
    rows = {}
    for kind in ("exact (offset product)", "integer zero point"):
        model, clipped, blocks = copy.deepcopy(bb.model), 0, 0
        for mod in model.modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            q41 = q4_1_blocks(mod.weight.detach().float().numpy().T) if kind == "integer zero point" else None
            if q41 is None:
                exact_twin(mod, 4)
                continue
            d, m, q = q41
            exact_z = -m / np.where(d > 0, d, 1)
            z = np.clip(np.rint(exact_z), 0, 15)
            clipped, blocks = clipped + int((np.rint(exact_z) != z).sum()), blocks + z.size
            w = d[..., None] * (q.astype(np.float32) - z[..., None])
            mod.weight.data = torch.from_numpy(w.reshape(w.shape[0], -1).astype(np.float32))
            mod.register_forward_pre_hook(int8_activations(BLOCK))
        rows[kind] = {"agreement_vs_fp32": float((top1(model) == ref).float().mean()),
                      "blocks": blocks, "zero_points_clipped": clipped}
        print(kind, rows[kind], file=sys.stderr, flush=True)
    res = {"command": command_line("benchmarks.studies.q4_1_zero_points", argv), "model": a.model,
           "heldout_tokens": int(windows.size), "rows": rows, "load_average": list(os.getloadavg())}
    md = "\n".join([f"# Q4_1 without the offset product: {a.model}, {windows.size} held-out tokens", "",
                    f"`{res['command']}`", "", "| encoding | top-1 agreement with fp32 (teacher-forced) |",
                    "|---|---:|"] + [f"| {k} | {r['agreement_vs_fp32']:.3f} |" for k, r in rows.items()]) + "\n"
    write_report(a.out, "q4_1_zero_points", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
