"""The host commands of `lama` (train, calibrate, export): a thin layer over `exporter.api`.

The `lama` program (`lama/cli.py`) composes these with the device commands of
`runtime/cli.py` (generate, chat, inspect); this module imports nothing from the runtime's
CLI, and the runtime imports nothing from the exporter. Imports are deferred to each command
so `lama --help` is instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HOST_COMMANDS = {"train": "train exit heads, then calibrate", "calibrate": "choose exit thresholds",
                 "export": "split into per-segment graphs with a manifest"}


def _print_reports(reports: dict) -> None:
    for r in reports.values():
        print(r.table())
        print()


def cmd_train(a: argparse.Namespace) -> None:
    from . import api
    from .checkpoint import read_config

    exits = a.exits
    if exits and exits != ["auto"]:
        try:
            exits = [int(e) for e in exits]
        except ValueError:
            raise ValueError(f"--exits takes layer counts or 'auto', got {' '.join(exits)}") from None
    out = api.train(a.model, out=a.out, data=a.data, exits=exits, head=a.head, target=a.target,
                    cache_dir=a.cache_dir, steps=a.steps, train_tokens=a.train_tokens, seed=a.seed, device=a.device,
                    overwrite=a.overwrite)
    cfg = read_config(out)
    rep = cfg.train["report"]
    print(f"trained {len(cfg.exits)} {cfg.head} heads (exits after layers {cfg.exits}) in {rep['seconds']:.1f} s "
          f"on {rep['tokens']} tokens (+{cfg.train['feature_cache_seconds']:.1f} s caching); "
          f"heads: {rep['head_bytes'] / 1e6:.2f} MB")
    print("agreement with the full model per exit, before -> after training:")
    print("  " + ", ".join(f"L{e}: {b:.3f}->{x:.3f}" for e, b, x in
                           zip(cfg.train.get("candidate_exits", cfg.exits), cfg.train["agreement_before"],
                               cfg.train["agreement_after"])))
    _print_reports(api.calibrate(out, target=cfg.policy.target))
    print(f"checkpoint: {out}")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from . import api

    reports = api.calibrate(a.checkpoint, target=a.target, delta=a.delta, budget=a.budget, confidence=a.confidence,
                            margin=a.margin, exit_min_share=a.exit_min_share, kv_policy=a.kv_policy,
                            min_agreement=a.min_agreement)
    if a.json:
        print(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    else:
        _print_reports(reports)


def cmd_export(a: argparse.Namespace) -> None:
    from . import api

    quant = {k: v for k, v in (("block_size", a.block_size), ("symmetric", a.symmetric),
                                ("accuracy_level", a.accuracy_level), ("exact_blocks", a.exact_blocks))
             if v is not None}
    out = api.export(a.checkpoint, out=a.out, precision=a.precision, backend=a.backend,
                     with_logits=a.with_logits, workspace_gb=a.workspace_gb, kv=a.kv, kv_capacity=a.kv_capacity,
                     data=a.data, quant_options=quant or None, exits=not a.no_exits)
    print(f"exported to {out}")
    from runtime.manifest import Manifest

    q = Manifest.load(out).quantization
    if q is not None:
        c = q.calibration
        print(f"{q.bits}-bit weights (blocks of {q.block_size}, {'symmetric' if q.symmetric else 'asymmetric'}, "
              f"accuracy level {q.accuracy_level}): {q.quantized_matmuls} MatMulNBits in {len(q.graphs)} graphs"
              + ("; GGUF blocks kept exactly: " + ", ".join(f"{n} {k}" for k, n in q.exact_blocks.items() if n)
                 if any(q.exact_blocks.values()) else ""))
        if "teacher_forced_agreement_vs_fp32" in c:
            print(f"quantized full model vs fp32: teacher-forced top-1 agreement "
                  f"{c['teacher_forced_agreement_vs_fp32']:.4f} on {c['teacher_forced_tokens']} held-out tokens, "
                  f"greedy agreement {c['greedy_agreement_vs_fp32']:.4f} ({c['greedy_prompts']} prompts x "
                  f"{c['greedy_new_tokens']} tokens)")
            print(f"thresholds (calibrated on the quantized model): {c['thresholds']} (fp32: {c['fp32_thresholds']})")
        else:
            print(f"thresholds: {c.get('scores')}")


def add_host_commands(sub) -> None:

    t = sub.add_parser("train", help="train exit heads on the frozen model's own predictions, then calibrate")
    t.add_argument("model", help="recipe name in models/ (e.g. smollm2-135m), recipe file, hub id or local folder")
    t.add_argument("--out", required=True, type=Path,
                   help="checkpoint folder to write (replaces only an empty folder or a LAMA checkpoint)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds something else (everything in it is deleted)")
    t.add_argument("--data", nargs="+", help="text files or folders (default: ../shared/data)")
    t.add_argument("--exits", nargs="+",
                   help="layer counts after which to place exits, or 'auto': candidates at every other layer, "
                        "those that send out < 1%% of calibration tokens at the target dropped")
    t.add_argument("--head", choices=["adapter", "full"], help="head kind (default: from the recipe)")
    t.add_argument("--target", type=float, help="agreement target for the first calibration")
    t.add_argument("--steps", type=int, help="training steps")
    t.add_argument("--train-tokens", type=int, help="tokens of training text")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="where caching and training run: auto (default: cuda if present), cpu, cuda")
    t.add_argument("--cache-dir", type=Path,
                   help="keep the frozen model's cached outputs here and reuse them on the next run "
                        "(default: a temporary folder beside --out, removed after training)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="choose exit thresholds: an agreement target or a compute budget")
    c.add_argument("checkpoint", type=Path)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", type=float, help="agreement with the full model, in (0, 1], e.g. 0.95")
    g.add_argument("--budget", type=float,
                   help="average compute as a share of this checkpoint's chain without early exits (EERO; exit "
                        "checks included), e.g. 0.5; 1 = the full model's output; the feasible range is printed, "
                        "a budget below it refused")
    c.add_argument("--delta", type=float, help="guarantee mode: target holds with probability >= 1 - delta")
    c.add_argument("--margin", type=float, help="plain mode: fit at target + margin, so that the target holds on new "
                   "text (default: the checkpoint's; the SmolLM2 recipe uses 0.03, measured per domain)")
    c.add_argument("--confidence", choices=["top1", "margin", "gate"],
                   help="score the thresholds apply to (default: keep the checkpoint's); gate = trained exit gates")
    c.add_argument("--exit-min-share", type=float,
                   help="first drop the exits that send out less than this share of the calibration tokens at "
                        "--target (each costs a check and a segment call; rewrites the checkpoint's heads and scores)")
    c.add_argument("--kv-policy", choices=["fill", "defer"],
                   help="KV policy the work is counted (and a budget fitted) for: default fill for --budget (the "
                        "policy under which exits save work), defer (the runtime's default) for --target")
    c.add_argument("--min-agreement", type=float, default=0.5,
                   help="--budget: refuse a budget whose held-out agreement with the full model (teacher-forced, "
                        "stored scores) falls below this (default 0.5; 0 accepts any)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("export", help="split into per-segment ONNX graphs (and TensorRT engines) with a manifest")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                   help="int8/int4: weight-only MatMulNBits graphs, thresholds recalibrated on the quantized model")
    e.add_argument("--data", nargs="+", help="int8/int4: where the training text is now, if it moved (default: the "
                   "recorded paths; the windows must match the hash lama train recorded)")
    e.add_argument("--block-size", type=int, help="int8/int4: weights per quantization block (default 32)")
    e.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="int8/int4: symmetric blocks (no zero point); default: symmetric")
    e.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="int8/int4: MatMulNBits accuracy_level (4 = int8 activations in the CPU kernel, default)")
    e.add_argument("--exact-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="keep weights that hold GGUF Q4_1/Q8_0 blocks exactly instead of re-quantizing them "
                        "(default: on for int4, off for int8)")
    e.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    e.add_argument("--with-logits", action="store_true",
                   help="also output full logits (every export samples over the heads' top-64 logits; "
                        "this widens sampling to the whole vocabulary)")
    e.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace limit")
    e.add_argument("--kv", choices=["concat", "buffer"], default=None,
                   help="KV cache layout: 'buffer' = preallocated buffers updated in place by onnxruntime's "
                        "GroupQueryAttention (Llama family, onnxruntime CPU; cost flat with context); 'concat' = "
                        "past in, past+new out (any family, TensorRT). Default: buffer where supported")
    e.add_argument("--kv-capacity", type=int, default=None,
                   help="positions each KV buffer holds (--kv buffer; default: the model's context length)")
    e.add_argument("--no-exits", action="store_true",
                   help="export the plain model as one graph, without exits (the baseline a chain is measured "
                        "against; exact decoding then drafts from the prompt only)")
    e.set_defaults(func=cmd_export)
