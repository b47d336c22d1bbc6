"""`lama` command line: a thin layer over `exporter.api` and `runtime`.

Imports are deferred to each command so `lama generate` works on a device that has only
the runtime installed (no torch), and `lama --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_reports(reports: dict) -> None:
    for r in reports.values():
        print(r.table())
        print()


def cmd_train(a: argparse.Namespace) -> None:
    from . import api
    from .checkpoint import read_config

    out = api.train(a.model, out=a.out, data=a.data, exits=a.exits, head=a.head, target=a.target,
                    steps=a.steps, train_tokens=a.train_tokens, seed=a.seed)
    cfg = read_config(out)
    rep = cfg.train["report"]
    print(f"trained {len(cfg.exits)} {cfg.head} heads (exits after layers {cfg.exits}) in {rep['seconds']:.1f} s "
          f"on {rep['tokens']} tokens (+{cfg.train['feature_cache_seconds']:.1f} s caching); "
          f"heads: {rep['head_bytes'] / 1e6:.2f} MB")
    print("agreement with the full model per exit, before -> after training:")
    print("  " + ", ".join(f"L{e}: {b:.3f}->{x:.3f}" for e, b, x in
                           zip(cfg.exits, cfg.train["agreement_before"], cfg.train["agreement_after"])))
    _print_reports(api.calibrate(out, target=cfg.policy["target"]))
    print(f"checkpoint: {out}")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from . import api

    reports = api.calibrate(a.checkpoint, target=a.target, delta=a.delta, budget=a.budget, confidence=a.confidence)
    if a.json:
        print(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    else:
        _print_reports(reports)


def cmd_export(a: argparse.Namespace) -> None:
    from . import api

    out = api.export(a.checkpoint, out=a.out, precision=a.precision, backend=a.backend,
                     with_logits=a.with_logits, workspace_gb=a.workspace_gb)
    print(f"exported to {out}")


def cmd_generate(a: argparse.Namespace) -> None:
    from runtime import GenerationResult, Runtime

    rt = Runtime.load(a.model_dir, providers=a.providers, kv_policy=a.kv_policy)
    thresholds = None
    if a.full:
        thresholds = "never"
    elif a.target is not None:
        thresholds = a.target
    records = []
    for rec in rt.generate(a.prompt, max_new_tokens=a.max_new_tokens, thresholds=thresholds,
                           temperature=a.temperature, seed=a.seed, stream=True):
        print(rec.text, end="", flush=True)
        records.append(rec)
    print()
    result = GenerationResult.from_records(rt.encode(a.prompt).tolist(), records, "", rt.manifest.model.num_layers)
    print(result.summary(), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lama", description="Self-supervised early exits for LLMs, exported per segment.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train exit heads on the frozen model's own predictions, then calibrate")
    t.add_argument("model", help="recipe name in models/ (e.g. smollm2-135m), recipe file, hub id or local folder")
    t.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    t.add_argument("--data", nargs="+", help="text files or folders (default: ../shared/data)")
    t.add_argument("--exits", type=int, nargs="+", help="layer counts after which to place exits")
    t.add_argument("--head", choices=["adapter", "full"], help="head kind (default: from the recipe)")
    t.add_argument("--target", type=float, help="agreement target for the first calibration")
    t.add_argument("--steps", type=int, help="training steps")
    t.add_argument("--train-tokens", type=int, help="tokens of training text")
    t.add_argument("--seed", type=int)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="choose exit thresholds: an agreement target or a compute budget")
    c.add_argument("checkpoint", type=Path)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", type=float, help="agreement with the full model, in (0, 1], e.g. 0.95")
    g.add_argument("--budget", type=float, help="average compute as a share of the full model (EERO), e.g. 0.5")
    c.add_argument("--delta", type=float, help="guarantee mode: target holds with probability >= 1 - delta")
    c.add_argument("--confidence", choices=["top1", "margin", "gate"],
                   help="score the thresholds apply to (default: keep the checkpoint's); gate = trained exit gates")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("export", help="split into per-segment ONNX graphs (and TensorRT engines) with a manifest")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    e.add_argument("--with-logits", action="store_true", help="also output full logits per segment (for sampling)")
    e.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace limit")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("generate", help="run an exported model on this device (no torch needed)")
    r.add_argument("model_dir", type=Path)
    r.add_argument("prompt")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--target", type=float, help="use thresholds for another target from the calibration table")
    r.add_argument("--full", action="store_true", help="never exit early (the full model)")
    r.add_argument("--kv-policy", choices=["defer", "copy"], default="defer")
    r.add_argument("--providers", nargs="+", help="onnxruntime providers, or 'tensorrt' for native engines")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # clear one-line errors, no traceback
        print(f"lama {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
