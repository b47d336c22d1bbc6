"""Side-by-side benchmark: plain PyTorch, optimum/onnxruntime, our segment chain, early exits, oracle.

    python -m benchmarks.run                          # stories260k, the quick CPU run
    python -m benchmarks.run --model smollm2-135m --threads 2 --repeats 3
    python -m benchmarks.run --help

For one model recipe (models/*.json) this trains a checkpoint if there is none, exports it,
takes prompts from the held-out split (exporter/data.py) and measures, per row:

    a  transformers generate, PyTorch, greedy, use_cache            (the model as shipped)
    b  the whole model exported by optimum, run by onnxruntime        (needs benchmarks/.venv-optimum)
    c  our segment chain with every exit off (thresholds="never")    (the export, no early exit)
    d  our runtime with calibrated exits: agreement targets 0.9/0.95/0.99 (the manifest's
       by_target table) and EERO compute budgets (exporter.budget.budget_thresholds)
    e  the oracle exit (every token leaves at its earliest agreeing exit): layers from the
       checkpoint's held-out scores; its speed is an ESTIMATE, row c's speed scaled by the
       layer fraction, never measured
    f  llama.cpp on the GGUF file as shipped                         (needs benchmarks/.venv-llamacpp)
    g  our chain exported at int8 / int4 (--precisions)
    h  onnxruntime-genai on its model builder's int4 graph            (needs benchmarks/.venv-genai)

Rows a-d are timed by benchmarks/optimum_worker.py, each in a process of its own (row b with
the python of benchmarks/.venv-optimum), all kept alive and taking turns pass by pass, so load
from other jobs on shared cores spreads over every row; speed-ups are medians of per-round
ratios. Quality is measured two ways: free-running (greedy tokens
and ROUGE-L of each row's continuation against row a's, position by position) and
teacher-forced on all held-out windows (agreement with the full model's top-1 and the
perplexity of the distribution the exit policy would use), computed here in PyTorch from the
checkpoint's heads. Writes results.json, results.md and speedup_vs_agreement.png to --out.
See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OPTIMUM_PYTHON = HERE / ".venv-optimum" / "bin" / "python"
LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
GENAI_PYTHON = HERE / ".venv-genai" / "bin" / "python"
_SHARED_CACHE = ROOT.parent / "shared" / "hf-cache"
if _SHARED_CACHE.is_dir():  # no hub is reachable here: models come from the shared cache
    os.environ.setdefault("HF_HUB_CACHE", str(_SHARED_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.policies import exit_policies, with_kv_policies  # noqa: E402 (after the environment set-up)
from benchmarks.quality import check_against_checkpoint, position_agreement, rouge_l, teacher_forced  # noqa: E402
from benchmarks.report import command_line, markdown, plain, plot, policy_table  # noqa: E402
from benchmarks.rows import (Setup, declare, full_model_rows, genai_row, llamacpp_row, policy_rows,  # noqa: E402
                             quantized_rows)
from benchmarks.timing import machine_info, main_versions, ratio_interval, summarize, time_rows  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402 (stdlib only)


# -- checkpoint, export, local model ---------------------------------------------------------------
def ensure_checkpoint(model: str, ckpt: Path, data: list[str] | None) -> float | None:
    """Train (and calibrate) one if `ckpt` holds none; seconds spent, None when reused."""
    if (ckpt / "lama.json").is_file():
        return None
    from exporter import api

    t0 = time.perf_counter()
    api.train(model, out=ckpt, data=data)
    return time.perf_counter() - t0


# precision variants a benchmark can compare in one run: name -> (precision, export options)
VARIANTS = {"int8": ("int8", None), "int4": ("int4", None),
            "int4-requant": ("int4", {"exact_blocks": False})}  # int4 before GGUF blocks were kept


def ensure_export(ckpt: Path, export_dir: Path, precision: str = "fp32", data: list[str] | None = None,
                  quant_options: dict | None = None) -> float | None:
    """Export once; again when the heads changed after the last export (or the precision or
    the exact-blocks choice differs)."""
    from exporter.quantize import SCHEMES, Scheme

    manifest = export_dir / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime >= (ckpt / "heads.safetensors").stat().st_mtime:
        m = json.loads(manifest.read_text())
        exact = bool(any(((m.get("quantization") or {}).get("exact_blocks") or {}).values()))
        if m.get("precision") == precision and (precision not in SCHEMES or exact == Scheme.for_precision(
                precision, **(quant_options or {})).exact_blocks):
            return None
    from exporter import api

    t0 = time.perf_counter()
    api.export(ckpt, out=export_dir, precision=precision, data=data, quant_options=quant_options)
    return time.perf_counter() - t0


def local_model(source) -> tuple[str, str | None]:
    """(folder, gguf file or None) that transformers and optimum-cli can load without a hub."""
    from exporter.fetch import resolve_local

    path, gguf = resolve_local(source)
    if not Path(path).exists():  # a hub id: its snapshot in the (offline) HF cache
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=source.revision, local_files_only=True)
    return str(path), gguf


# -- the benchmark ---------------------------------------------------------------------------------
def pick_prompts(windows: np.ndarray, n: int, length: int) -> list[list[int]]:
    if length >= windows.shape[1]:
        raise ValueError(f"--prompt-tokens {length} must be shorter than the {windows.shape[1]}-token windows")
    rows = np.linspace(0, len(windows) - 1, num=min(n, len(windows))).round().astype(int)
    return [windows[i, :length].tolist() for i in rows]


def benchmark(args) -> dict:
    import torch

    from exporter.backbone import load_backbone
    from exporter.checkpoint import Checkpoint
    from exporter.data import default_data_dir, make_splits, read_docs
    from exporter.scores import oracle, simulate

    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)  # training and teacher forcing here are not timed
    work = Path(args.work or ROOT / "runs" / "bench" / args.model)
    ckpt = Path(args.ckpt) if args.ckpt else work / "ckpt"
    export_dir = Path(args.export) if args.export else work / "onnx"
    info = {"machine": machine_info(), "versions": main_versions()}
    train_s = ensure_checkpoint(args.model, ckpt, args.data)
    # an export given with --export keeps its own precision (it was re-exported as fp32 before,
    # silently replacing an int4 export the user had pointed at); one made here is fp32
    given = Path(args.export) / "manifest.json" if args.export else None
    precision = json.loads(given.read_text()).get("precision", "fp32") if given and given.is_file() else "fp32"
    export_s = ensure_export(ckpt, export_dir, precision)
    checkpoint = Checkpoint.open(ckpt)  # its scores are those the thresholds apply to (head or gate)
    config = checkpoint.config
    cfg = config.train["config"]  # the TrainConfig fields training used
    heldout_scores = checkpoint.scores("heldout")

    # held-out windows exactly as training drew them (same text, tokenizer, seq_len, token counts, seed)
    bb = load_backbone(config.source)
    heads = checkpoint.heads(bb)
    # thresholds apply to the gates' scores, not the heads' confidence
    gates = checkpoint.gates(bb) if config.confidence == "gate" else None
    texts = read_docs(args.data or [default_data_dir()])  # with domains: the same windows as `lama train`
    counts = {split: cfg[f"{split}_tokens"] for split in ("train", "calib", "heldout")}
    splits = make_splits(texts, bb.tokenizer, cfg["seq_len"], counts, seed=cfg["seed"])
    windows = splits["heldout"].ids
    prompts = pick_prompts(windows, args.prompts, args.prompt_tokens)

    calib_scores = checkpoint.scores("calibration")
    policies, skipped = exit_policies(export_dir, args.targets, args.budgets, calib_scores, args.budget_unit)
    t0 = time.perf_counter()
    tf = teacher_forced(bb, heads, windows, config.confidence, gates)
    tf_s = time.perf_counter() - t0
    check = check_against_checkpoint(tf, heldout_scores)
    tf_scores = tf.scores()
    full_tf = tf.evaluate(np.full(len(tf.nll), len(tf.exit_layers)))
    oracle_tf = tf.evaluate(oracle(tf_scores).exit_index)
    oracle_scores = oracle(heldout_scores)  # all held-out positions, as the checkpoint stored them
    model_path, gguf = local_model(config.source)
    tokenizer = bb.tokenizer
    del bb, heads, gates

    # timing rows: one process each, interleaved pass by pass
    setup = Setup({"prompts": prompts, "max_new_tokens": args.new_tokens, "threads": args.threads,
                   "thread_pool": args.thread_pool},
                  model_path, gguf, work, export_dir)

    def evaluate(p) -> dict:  # a policy row's teacher-forced figures and its simulated held-out outcome
        kv = "fill" if p.kv == "fill" else "defer"
        return {"teacher_forced": tf.evaluate(simulate(tf_scores, p.thresholds).exit_index),
                "heldout_simulated": _outcome(simulate(heldout_scores, p.thresholds, kv_policy=kv))}

    entries = (full_model_rows(setup, Path(args.optimum_python), full_tf)
               + policy_rows(setup, with_kv_policies(policies, args.kv_policies), args.max_pending, evaluate)
               + [llamacpp_row(setup, Path(args.llamacpp_python)),
                  genai_row(setup, Path(args.genai_python), Path(args.genai_dir) if args.genai_dir
                            else work / "genai-int4")])
    quant = {}
    for prec in args.precisions:  # rows g: each precision's own export, thresholds calibrated on it
        qdir = work / f"onnx-{prec}"
        precision, options = VARIANTS[prec]
        ensure_export(ckpt, qdir, precision, args.data, options)
        m = Manifest.load(qdir)
        quant[prec] = dataclasses.asdict(m.quantization) if m.quantization else None
        entries += quantized_rows(setup, prec, qdir, m, args.quant_targets)
    rows, specs = declare(entries)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lama-bench-") as tmp:
        measured, failed = time_rows(specs, args.repeats, Path(tmp), args.timeout)
    timing_s = time.perf_counter() - t0
    for r in rows:
        if r["row"] in measured:
            m = measured[r["row"]]
            r.update(status="ok", measured={**{k: v for k, v in m.items() if k != "passes"},
                                            **summarize(m["passes"])})
        elif r["row"] in failed:
            r.update(status="skipped", reason=failed[r["row"]])
    for key, reason in skipped:
        rows.append({"row": key, "status": "skipped", "reason": reason})

    derive(rows, config.num_layers, oracle_scores.layers, oracle_tf)
    same_precision_agreement(rows)
    samples = _samples(rows, prompts, tokenizer)
    return {
        "model": args.model, "source": asdict(config.source), "checkpoint": str(ckpt), "export": str(export_dir),
        "exits": config.exits, "num_layers": config.num_layers, "head": config.head, "confidence": config.confidence,
        "train_config": cfg,
        "settings": {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "budget_unit": args.budget_unit, "kv_policies": args.kv_policies,
                     "max_pending": args.max_pending, "thread_pool": args.thread_pool,
                     "exit_check_cost_layers": calib_scores.check_cost,
                     "plain_chain_compute": float(calib_scores.costs()[-1]), "threads": args.threads,
                     "heldout_windows": int(len(windows)),
                     "seq_len": cfg["seq_len"]},
        **info, "train_seconds": train_s, "export_seconds": export_s, "teacher_forced_seconds": tf_s,
        "timing_seconds": timing_s,
        "heldout_scores_check": check, "rows": rows, "samples": samples, "quantization": quant,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_seconds": time.perf_counter() - t_start,
    }


def same_precision_agreement(rows: list[dict]) -> None:
    """Quantized rows with exits: greedy agreement with the same-precision chain with exits off."""
    by = {r["row"]: r for r in rows}
    for r in rows:
        ref = by.get(r.get("same_precision_full") or "", {}).get("measured")
        if r.get("measured") and ref:
            pairs = zip(ref["tokens"], r["measured"]["tokens"])
            r["greedy_agreement_same_precision"] = float(np.mean([position_agreement(a, b) for a, b in pairs]))


def _outcome(o) -> dict:
    return {"agreement": o.agreement, "mean_layers": o.layers, "compute": o.compute,
            "coverage": [round(float(x), 4) for x in o.coverage]}


def derive(rows: list[dict], num_layers: int, oracle_layers: float, oracle_tf: dict) -> None:
    """Fill the comparable numbers of every row, add the oracle row (e), and the ratios."""
    by = {r["row"][0]: r for r in rows if r["row"][0] in "abc"}  # the full-model rows
    ref = by.get("a", {}).get("measured", {}).get("tokens")
    for r in rows:
        m = r.get("measured")
        if not m:
            continue
        r["tokens_per_second"] = m["tokens_per_second"]
        r["first_token_ms"] = m["first_token_seconds"] * 1e3
        r["peak_rss_mb"] = m["peak_rss_mb"]
        r["rss_after_imports_mb"] = m["rss_after_imports_mb"]
        r["mean_layers"] = (float(np.mean([x for seq in m["layers"] for x in seq])) if "layers" in m
                            else float(num_layers))
        r["work_share"] = m["work"]["share"] if "work" in m else 1.0  # layer-positions vs the plain model
        r["decode_work_share"] = m["work"]["decode_share"] if "work" in m else 1.0
        r["p95_ms"] = m.get("latency_ms", {}).get("p95")
        if ref is not None:
            r["greedy_agreement"] = float(np.mean([position_agreement(a, b) for a, b in zip(ref, m["tokens"])]))
            r["rouge_l"] = float(np.mean([rouge_l(a, b) for a, b in zip(ref, m["tokens"])]))
            r["identical_to_a"] = m["tokens"] == ref

    def ratios(r: dict, base: dict) -> list[float] | None:
        """Per-round ratios of tokens/s: the rows of one round ran back to back."""
        x = r.get("measured", {}).get("tokens_per_second_runs")
        y = base.get("measured", {}).get("tokens_per_second_runs")
        return [a / b for a, b in zip(x, y)] if x and y else None

    def paired(r: dict, base: dict) -> float | None:
        q = ratios(r, base)
        return statistics.median(q) if q else None

    def interval(r: dict, base: dict) -> list[float] | None:
        q = ratios(r, base)
        return ratio_interval(q) if q else None

    chain = by.get("c") if by.get("c", {}).get("measured") else None
    layer_gain = num_layers / oracle_layers
    if chain:
        rows.append({"row": "e: oracle exit (estimate)", "kind": "oracle", "status": "estimate",
                     "tokens_per_second": chain["tokens_per_second"] * layer_gain, "mean_layers": oracle_layers,
                     "speedup_vs_chain": layer_gain, "teacher_forced": oracle_tf,
                     "note": "not measured: row c's tokens/s x num_layers / oracle mean layers (held-out scores)"})
    base_key = "b" if by.get("b", {}).get("measured") else "c"
    base = by.get(base_key) if by.get(base_key, {}).get("measured") else None
    llama = next((r for r in rows if r["row"].startswith("f") and r.get("measured")), None)
    for r in rows:
        if r.get("measured"):
            if base:
                r["speedup"], r["speedup_baseline"] = paired(r, base), base_key
                r["speedup_ci95"] = interval(r, base)
            if chain:
                r["speedup_vs_chain"] = paired(r, chain)
            if llama:
                r["vs_llamacpp"], r["vs_llamacpp_ci95"] = paired(r, llama), interval(r, llama)
        elif r["kind"] == "oracle" and base and chain:
            r["speedup"], r["speedup_baseline"] = paired(chain, base) * layer_gain, base_key
        if r["kind"] in ("target", "budget") and r.get("speedup_vs_chain") and layer_gain > 1:
            r["share_of_oracle_speedup"] = (r["speedup_vs_chain"] - 1) / (layer_gain - 1)


def _samples(rows: list[dict], prompts: list[list[int]], tokenizer) -> list[dict]:
    out = []
    for r in rows:
        m = r.get("measured")
        if m:
            out.append({"row": r["row"], "continuation": tokenizer.decode(m["tokens"][0])})
    return [{"prompt": tokenizer.decode(prompts[0])}] + out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260k", help="recipe name in models/ (default: stories260k)")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<model>)")
    p.add_argument("--work", help="checkpoint/export/optimum folder (default: runs/bench/<model>)")
    p.add_argument("--ckpt", help="existing checkpoint (default: <work>/ckpt, trained when missing)")
    p.add_argument("--export", help="per-segment export for rows c/d (default: <work>/onnx, exported as fp32 when missing; "
                   "an existing export keeps its precision, and is exported again only when the heads changed)")
    p.add_argument("--data", nargs="+", help="training text (default: ../shared/data, as `lama train`)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed rounds; each row runs one pass over all prompts per round (default 15)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and onnxruntime in every row (default 1: on stories260k every row ran "
                        "faster and steadier with 1 than with 2 on a shared 2-core machine; try 2 for smollm2)")
    p.add_argument("--targets", type=float, nargs="*", default=[0.9, 0.95, 0.99], help="agreement targets")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.75, 1.0],
                   help="EERO budgets (default 0.75 1.0; give none for no budget rows)")
    p.add_argument("--budget-unit", choices=("compute", "layers"), default="compute",
                   help="compute: fraction of the plain model's compute, exit checks included (as `lama calibrate "
                        "--budget`); layers: mean decoder layers per token")
    p.add_argument("--kv-policies", nargs="+", choices=("defer", "fill", "exact"), default=["defer"],
                   help="KV policies for the exit rows (default: defer). fill: skipped layers get only K/V "
                        "projections; exact: defer + verification by the full model's head (its greedy output)")
    p.add_argument("--max-pending", type=int, help="runtime bound on deferred positions (default: the export's)")
    p.add_argument("--thread-pool", choices=["shared", "session"], default="session",
                   help="our chain's onnxruntime threads: one pool per session (default) or one shared spinning pool")
    p.add_argument("--optimum-python", default=str(OPTIMUM_PYTHON), help="python of the optimum venv")
    p.add_argument("--llamacpp-python", default=str(LLAMACPP_PYTHON), help="python of the llama.cpp venv (row f)")
    p.add_argument("--genai-python", default=str(GENAI_PYTHON), help="python of the onnxruntime-genai venv (row h)")
    p.add_argument("--genai-dir", help="row h's int4 build (default: <work>/genai-int4, built there when missing)")
    p.add_argument("--precisions", nargs="*", default=["int8", "int4"], choices=sorted(VARIANTS),
                   help="quantized exports timed as rows g (default int8 int4; give none for no such rows)")
    p.add_argument("--quant-targets", type=float, nargs="*", default=[0.95],
                   help="agreement targets for the quantized rows (besides exits off; default 0.95)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is skipped")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or HERE / "results" / args.model)
    command = command_line("benchmarks.run", argv)
    res = benchmark(args)
    out.mkdir(parents=True, exist_ok=True)
    res["command"] = command.strip()
    (out / "results.json").write_text(json.dumps(plain(res), indent=1, allow_nan=False))
    (out / "results.md").write_text(markdown(res, command.strip()))
    if args.kv_policies != ["defer"]:
        (out / "kv_policies.md").write_text(policy_table(res, command.strip()))
    plot(res, out / "speedup_vs_agreement.png")
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, speedup_vs_agreement.png in {res['wall_seconds']:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
