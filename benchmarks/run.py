"""Side-by-side benchmark: plain PyTorch, optimum/onnxruntime, our segment chain, early exits, oracle.

    python benchmarks/run.py                          # stories260k, the quick CPU run
    python benchmarks/run.py --model smollm2-135m --threads 2 --repeats 3
    python benchmarks/run.py --help

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
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "optimum_worker.py"
WORKERS = {"llamacpp": HERE / "llamacpp_worker.py"}  # backends timed by another script (same protocol)
OPTIMUM_PYTHON = HERE / ".venv-optimum" / "bin" / "python"
LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
_SHARED_CACHE = ROOT.parent / "shared" / "hf-cache"
if _SHARED_CACHE.is_dir():  # no hub is reachable here: models come from the shared cache
    os.environ.setdefault("HF_HUB_CACHE", str(_SHARED_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from runtime.manifest import to_json_thresholds  # noqa: E402 (stdlib only; after the path set-up)


# -- quality metrics on token ids ------------------------------------------------------------------
def rouge_l(reference: list[int], candidate: list[int]) -> float:
    """ROUGE-L F1: longest common subsequence over tokens, F-measure of its precision and recall."""
    if not reference or not candidate:
        return float(reference == candidate)
    prev = [0] * (len(candidate) + 1)
    for r in reference:  # O(len(ref) * len(cand)) dynamic programme, one row at a time
        cur = [0]
        for j, c in enumerate(candidate):
            cur.append(prev[j] + 1 if r == c else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def position_agreement(reference: list[int], candidate: list[int]) -> float:
    n = max(len(reference), len(candidate))
    return sum(a == b for a, b in zip(reference, candidate)) / n if n else 1.0


# -- checkpoint, export, local model ---------------------------------------------------------------
def ensure_checkpoint(model: str, ckpt: Path, data: list[str] | None) -> float | None:
    """Train (and calibrate) one if `ckpt` holds none; seconds spent, None when reused."""
    if (ckpt / "lama.json").is_file():
        return None
    from exporter import api

    t0 = time.perf_counter()
    api.train(model, out=ckpt, data=data)
    return time.perf_counter() - t0


def ensure_export(ckpt: Path, export_dir: Path, precision: str = "fp32", data: list[str] | None = None
                  ) -> float | None:
    """Export once; again when the heads changed after the last export (or the precision differs)."""
    manifest = export_dir / "manifest.json"
    if (manifest.is_file() and manifest.stat().st_mtime >= (ckpt / "heads.safetensors").stat().st_mtime
            and json.loads(manifest.read_text()).get("precision") == precision):
        return None
    from exporter import api

    t0 = time.perf_counter()
    api.export(ckpt, out=export_dir, precision=precision, data=data)
    return time.perf_counter() - t0


def local_model(source) -> tuple[str, str | None]:
    """(folder, gguf file or None) that transformers and optimum-cli can load without a hub."""
    from exporter.fetch import resolve_local

    path, gguf = resolve_local(source)
    if not Path(path).exists():  # a hub id: its snapshot in the (offline) HF cache
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=source.revision, local_files_only=True)
    return str(path), gguf


# -- exit policies ---------------------------------------------------------------------------------
@dataclass
class Policy:
    key: str  # row id, e.g. "d: target 0.9"
    kind: str  # "full" | "target" | "budget"
    value: float | None
    thresholds: list[float]  # per exit, inf = never: what the teacher-forced evaluation applies
    runtime: object  # what the worker passes as Runtime.generate(thresholds=...)
    kv: str = "defer"  # "defer", "fill" or "exact" (defer + verification)


def _scores(ckpt: Path, split: str, confidence: str):
    """The checkpoint's stored ExitScores for the score its thresholds apply to (head or gate)."""
    from exporter.checkpoint import read_scores

    if confidence == "gate":
        return read_scores(ckpt, split, "gate")
    return read_scores(ckpt, split)


def exit_policies(export_dir: Path, targets: list[float], budgets: list[float], calib, budget_unit: str = "compute"
                  ) -> tuple[list[Policy], list[tuple[str, str]]]:
    from runtime.manifest import Manifest, ManifestError

    manifest = Manifest.load(export_dir)
    n = len(manifest.exits)
    inf = float("inf")
    policies = [Policy("c: chain, exits off", "full", None, [inf] * n, "never")]
    skipped: list[tuple[str, str]] = []
    for t in targets:
        try:
            th = [inf if x is None else float(x) for x in manifest.thresholds_for(t)]
            policies.append(Policy(f"d: target {t:g}", "target", t, th, t))
        except ManifestError as e:
            skipped.append((f"d: target {t:g}", str(e)))
    name = "d: budget {:g}" + (" layers" if budget_unit == "layers" else "")
    if budgets:
        try:
            from exporter.budget import budget_thresholds
        except ImportError as e:
            reason = f"exporter.budget.budget_thresholds is not importable here ({e})"
            skipped += [(name.format(b), reason) for b in budgets]
        else:
            for b in budgets:  # EERO on the calibration scores; a per-exit list needs no re-export
                try:
                    th = [float(x) for x in budget_thresholds(calib, b, unit=budget_unit).thresholds]
                except ValueError as e:
                    skipped.append((name.format(b), str(e)))
                    continue
                policies.append(Policy(name.format(b), "budget", b, th, to_json_thresholds(th)))
    return policies, skipped


def with_kv_policies(policies: list[Policy], kvs: list[str]) -> list[Policy]:
    """Each exit policy under each KV policy; the first KV policy keeps the plain row name.
    Row c (exits off) runs once: every KV policy is the full model there."""
    from dataclasses import replace

    out = []
    for p in policies:
        for i, kv in enumerate(kvs if p.kind != "full" else kvs[:1]):
            out.append(replace(p, kv=kv, key=p.key if i == 0 and kv == "defer" else f"{p.key} [{kv}]"))
    return out


# -- teacher-forced evaluation on the held-out windows -------------------------------------------
@dataclass
class TeacherForced:
    """Per held-out position (the last of each window has no next token and is left out):
    confidence of each exit, top-1 of each exit and the full model, NLL of the true next token."""

    confidence: np.ndarray  # (N, E)
    top1: np.ndarray  # (N, E+1), last column = full model
    nll: np.ndarray  # (N, E+1)
    sequence: np.ndarray  # (N,)
    exit_layers: list[int]
    num_layers: int
    scores_check: dict = field(default_factory=dict)

    def scores(self):
        from exporter.scores import ExitScores

        agree = self.top1[:, :-1] == self.top1[:, -1:]
        return ExitScores(self.confidence, agree, self.sequence, self.exit_layers, self.num_layers)

    def evaluate(self, exit_idx: np.ndarray) -> dict:
        n = len(exit_idx)
        rows = np.arange(n)
        layers = np.asarray(self.exit_layers + [self.num_layers], dtype=np.float64)
        return {"perplexity": float(np.exp(self.nll[rows, exit_idx].mean())),
                "agreement": float((self.top1[rows, exit_idx] == self.top1[:, -1]).mean()),
                "mean_layers": float(layers[exit_idx].mean()), "tokens": int(n)}


def teacher_forced(bb, heads, windows: np.ndarray, confidence_kind: str, gates=None, batch: int = 4
                   ) -> TeacherForced:
    import torch

    from exporter.heads import confidence

    exits = list(heads.exits)
    conf_all, top_all, nll_all = [], [], []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[s:s + batch])  # (B, S)
            captured, full = bb.forward(ids, capture=exits)
            target = ids[:, 1:].unsqueeze(-1)  # (B, S-1, 1)
            confs, tops, nlls = [], [], []
            for k, layer in enumerate(exits + [None]):
                logits = full if layer is None else heads.logits(k, captured[layer])  # (B, S, V)
                tok, c = confidence(logits, "top1" if confidence_kind == "gate" else confidence_kind)
                if layer is not None and gates is not None:
                    c = gates.score(k, captured[layer])
                logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
                nlls.append(-logp.gather(-1, target).squeeze(-1))
                tops.append(tok)
                if layer is not None:
                    confs.append(c)
            conf_all.append(torch.stack(confs, -1).numpy())  # (B, S, E), every position
            top_all.append(torch.stack(tops, -1).numpy())  # (B, S, E+1)
            nll_all.append(torch.stack(nlls, -1).double().numpy())  # (B, S-1, E+1)
    conf, top, nll = np.concatenate(conf_all), np.concatenate(top_all), np.concatenate(nll_all)
    w, s, e = conf.shape
    seq = np.repeat(np.arange(w), s - 1)
    tf = TeacherForced(conf[:, :-1].reshape(-1, e), top[:, :-1].reshape(-1, e + 1), nll.reshape(-1, e + 1), seq,
                       exits, bb.shape.num_layers)
    tf.scores_check = {"all_positions_confidence": conf.reshape(-1, e),
                       "all_positions_agree": (top[..., :-1] == top[..., -1:]).reshape(-1, e)}
    return tf


def check_against_checkpoint(tf: TeacherForced, heldout) -> dict:
    """Do our held-out windows and head outputs reproduce the checkpoint's heldout_scores.npz?"""
    conf, agree = tf.scores_check.pop("all_positions_confidence"), tf.scores_check.pop("all_positions_agree")
    if conf.shape != heldout.confidence.shape:
        return {"match": False, "reason": f"{conf.shape[0]} held-out positions here, {heldout.num_tokens} in the "
                                          "checkpoint: it was trained on other text or split settings"}
    diff = float(np.abs(conf - heldout.confidence).max())
    agree_same = float((agree == heldout.agree).mean())
    return {"match": bool(diff < 1e-3 and agree_same > 0.999), "max_confidence_diff": diff,
            "agree_equal_share": agree_same}


# -- timing rows -----------------------------------------------------------------------------------
class Worker:
    """One row's optimum_worker.py process, kept alive so that rows take turns pass by pass."""

    def __init__(self, key: str, python: Path, spec: dict, tmp: Path, timeout: float):
        self.key, self.timeout = key, timeout
        slug = "".join(ch if ch.isalnum() else "_" for ch in key)
        path = tmp / f"{slug}.json"
        path.write_text(json.dumps(spec))
        self.stderr = open(tmp / f"{slug}.err", "w+")
        script = WORKERS.get(spec["backend"], WORKER)
        self.proc = subprocess.Popen([str(python), str(script), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=os.environ.copy())

    def ask(self, command: str | None = None) -> dict:
        """Send a command (None: just wait for the next answer) and read one JSON line."""
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            self.stderr.seek(0)
            lines = [x for x in self.stderr.read().strip().splitlines() if x.strip()]
            why = "timed out" if not ready else f"exited with code {self.proc.returncode}"
            raise RuntimeError(f"worker {why}: {lines[-1] if lines else 'no error output'}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def time_rows(specs: dict[str, tuple[Path, dict]], repeats: int, tmp: Path, timeout: float
              ) -> tuple[dict[str, dict], dict[str, str]]:
    """Start every row's worker (one at a time, so loading is not timed against each other), then
    `repeats` rounds in which each row runs one pass over all prompts, the order rotating by one
    every round. Returns {row: {"passes": [...], **summary}} and {row: why it failed}."""
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    for key, (python, spec) in specs.items():
        print(f"[bench] loading {key}", file=sys.stderr, flush=True)
        w = Worker(key, python, spec, tmp, timeout)
        try:
            w.ask()  # ready
            workers[key] = w
        except RuntimeError as e:
            failed[key] = str(e)
    passes: dict[str, list[dict]] = {k: [] for k in workers}
    for i in range(repeats):
        order = list(workers)
        order = order[i % len(order):] + order[:i % len(order)] if order else order
        for key in order:
            if key in failed:
                continue
            try:
                passes[key].append(workers[key].ask("pass"))
            except RuntimeError as e:
                failed[key] = str(e)
        done = {k: f"{p[-1]['tokens_per_second']:.0f}" for k, p in passes.items() if p and k not in failed}
        print(f"[bench] round {i + 1}/{repeats} tokens/s: {done}", file=sys.stderr, flush=True)
    out = {}
    for key, w in workers.items():
        if key not in failed:
            try:
                out[key] = {"passes": passes[key], **w.ask("quit")}
            except RuntimeError as e:
                failed[key] = str(e)
        w.close()
        w.stderr.close()
    return out, failed


def summarize(passes: list[dict]) -> dict:
    """Medians over passes, the spread, the tokens of the first pass, determinism across passes."""
    tps = [p["tokens_per_second"] for p in passes]
    ftl = [p["first_token_seconds"] for p in passes]
    med = statistics.median(tps)
    out = {"tokens_per_second": med, "tokens_per_second_runs": tps, "tokens_per_second_best": max(tps),
           "tokens_per_second_spread": (max(tps) - min(tps)) / 2 / med if med else None,
           "first_token_seconds": statistics.median(ftl), "first_token_seconds_runs": ftl,
           "deterministic": all(p["tokens"] == passes[0]["tokens"] for p in passes),
           "tokens": passes[0]["tokens"]}
    extras = [e for p in passes for e in p["extra"] if e]
    if extras:
        out["layers"] = [e["layers"] for e in passes[0]["extra"]]
        steps = [x for e in extras for x in e["step_seconds"][1:]]
        out["runtime_step_tokens_per_second"] = len(steps) / sum(steps) if sum(steps) > 0 else None
        # per-token decode latency over all passes and prompts (the first token carries the prefill)
        out["latency_ms"] = {k: float(np.percentile(steps, q)) * 1e3 for k, q in (("p50", 50), ("p95", 95))}
        out["latency_ms"]["max"] = max(steps) * 1e3
        first = passes[0]["extra"]  # work is deterministic: one pass says it
        if "layer_positions" in first[0]:
            n = sum(len(e["layers"]) for e in first)
            run = sum(e["layer_positions"] for e in first)
            out["work"] = {"layer_positions_per_token": run / n,
                           "plain_layer_positions_per_token": sum(e["plain_layer_positions"] for e in first) / n,
                           "share": run / sum(e["plain_layer_positions"] for e in first),
                           "owed_share": sum(e["owed"] for e in first) / sum(e["plain_layer_positions"] for e in first),
                           # decode steps only (what a budget bounds): tokens after the first, vs num_layers each
                           "decode_share": sum(sum(e["step_layer_positions"][1:]) for e in first)
                           / max(1, sum((len(e["layers"]) - 1) * e["num_layers"] for e in first)),
                           "fill_positions_per_token": sum(e["fill_positions"] for e in first) / n,
                           "calls_per_token": sum(e["calls"] for e in first) / n,
                           "rollbacks_per_token": sum(e["rollbacks"] for e in first) / n}
    return out


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": affinity, "memory_gib": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "onnxruntime", "onnx", "numpy", "tokenizers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


# -- the benchmark ---------------------------------------------------------------------------------
def pick_prompts(windows: np.ndarray, n: int, length: int) -> list[list[int]]:
    if length >= windows.shape[1]:
        raise ValueError(f"--prompt-tokens {length} must be shorter than the {windows.shape[1]}-token windows")
    rows = np.linspace(0, len(windows) - 1, num=min(n, len(windows))).round().astype(int)
    return [windows[i, :length].tolist() for i in rows]


def benchmark(args) -> dict:
    import torch

    from exporter.backbone import load_backbone
    from exporter.checkpoint import load_heads, read_config
    from exporter.data import default_data_dir, make_splits, read_texts
    from exporter.scores import oracle, simulate

    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)  # training and teacher forcing here are not timed
    work = Path(args.work or ROOT / "runs" / "bench" / args.model)
    ckpt = Path(args.ckpt) if args.ckpt else work / "ckpt"
    export_dir = Path(args.export) if args.export else work / "onnx"
    info = {"machine": machine_info(), "versions": main_versions()}
    train_s = ensure_checkpoint(args.model, ckpt, args.data)
    export_s = ensure_export(ckpt, export_dir)
    config = read_config(ckpt)
    cfg = config.train["config"]  # the TrainConfig fields training used
    heldout_scores = _scores(ckpt, "heldout", config.confidence)

    # held-out windows exactly as training drew them (same text, tokenizer, seq_len, token counts, seed)
    bb = load_backbone(config.source)
    heads = load_heads(ckpt, bb, config)
    gates = None
    if config.confidence == "gate":  # thresholds apply to the gates' scores, not the heads' confidence
        from exporter.checkpoint import load_gates

        gates = load_gates(ckpt, bb, config)
    texts = read_texts(args.data or [default_data_dir()])
    counts = {split: cfg[f"{split}_tokens"] for split in ("train", "calib", "heldout")}
    splits = make_splits(texts, bb.tokenizer, cfg["seq_len"], counts, seed=cfg["seed"])
    windows = splits["heldout"].ids
    prompts = pick_prompts(windows, args.prompts, args.prompt_tokens)

    calib_scores = _scores(ckpt, "calibration", config.confidence)
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
    base = {"prompts": prompts, "max_new_tokens": args.new_tokens, "threads": args.threads}
    py = Path(sys.executable)
    specs: dict[str, tuple[Path, dict]] = {}
    rows: list[dict] = [{"row": "a: PyTorch generate", "kind": "full", "teacher_forced": full_tf}]
    specs[rows[-1]["row"]] = (py, {**base, "backend": "torch", "model_path": model_path, "gguf_file": gguf})
    optimum_py = Path(args.optimum_python)
    rows.append({"row": "b: optimum + onnxruntime", "kind": "full", "teacher_forced": full_tf})
    if optimum_py.is_file():
        specs[rows[-1]["row"]] = (optimum_py, {**base, "backend": "optimum", "model_path": model_path,
                                               "gguf_file": gguf, "onnx_dir": str(work / "optimum-onnx")})
    else:
        rows[-1].update(status="skipped", reason=f"{optimum_py} not found: run `bash benchmarks/setup_optimum.sh` "
                                                 "to create the optimum venv (transformers 4.57 + optimum-onnx)")
    policies = with_kv_policies(policies, args.kv_policies)
    for p in policies:
        sim_kv = "fill" if p.kv == "fill" else "defer"
        rows.append({"row": p.key, "kind": p.kind, "value": p.value, "kv_policy": p.kv,
                     "thresholds": to_json_thresholds(p.thresholds),
                     "teacher_forced": tf.evaluate(simulate(tf_scores, p.thresholds).exit_index),
                     "heldout_simulated": _outcome(simulate(heldout_scores, p.thresholds, kv_policy=sim_kv))})
        specs[p.key] = (py, {**base, "backend": "lama", "export_dir": str(export_dir), "thresholds": p.runtime,
                             "repo_root": str(ROOT), "kv_policy": sim_kv, "exact": p.kv == "exact",
                             "max_pending": args.max_pending})
    quant = extra_rows(args, rows, specs, base, work, ckpt, (model_path, gguf))
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
                     "max_pending": args.max_pending,
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


# -- declared extra rows: llama.cpp on the shipped GGUF, our chain at int8 / int4 ----------------------
def extra_rows(args, rows: list[dict], specs: dict, base: dict, work: Path, ckpt: Path, model: tuple[str, str | None]
               ) -> dict:
    """Row f: llama.cpp on the same GGUF file; rows g: the chain exported at each of --precisions,
    exits off and at each of --quant-targets (thresholds calibrated on the quantized model).
    Returns each quantized export's quantization record from its manifest."""
    from runtime.manifest import Manifest

    key = "f: llama.cpp (the GGUF as shipped)"
    rows.append({"row": key, "kind": "full"})
    llama_py = Path(args.llamacpp_python)
    if not model[1]:
        rows[-1].update(status="skipped", reason="this model has no GGUF file for llama.cpp to load")
    elif not llama_py.is_file():
        rows[-1].update(status="skipped", reason=f"{llama_py} not found: run `bash benchmarks/setup_llamacpp.sh`")
    else:
        specs[key] = (llama_py, {**base, "backend": "llamacpp", "gguf_path": str(Path(model[0]) / model[1])})
    records = {}
    for prec in args.precisions:
        qdir = work / f"onnx-{prec}"
        ensure_export(ckpt, qdir, prec, args.data)
        m = Manifest.load(qdir)
        records[prec] = dataclasses.asdict(m.quantization) if m.quantization else None
        full = f"g: {prec} chain, exits off"
        for label, th in [("exits off", "never")] + [(f"target {t:g}", t) for t in args.quant_targets]:
            row = {"row": f"g: {prec} chain, {label}", "kind": "quant-full" if th == "never" else "quant-target",
                   "precision": prec, "value": None if th == "never" else th, "same_precision_full": full}
            rows.append(row)
            if th != "never" and f"{th:g}" not in m.calibration.by_target:
                row.update(status="skipped", reason=f"no thresholds for target {th:g} in {qdir}")
                continue
            specs[row["row"]] = (Path(sys.executable), {**base, "backend": "lama", "export_dir": str(qdir),
                                                        "thresholds": th, "repo_root": str(ROOT)})
    return records


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

    def paired(r: dict, base: dict) -> float | None:
        """Median over rounds of the per-round ratio: the rows of one round ran back to back."""
        x = r.get("measured", {}).get("tokens_per_second_runs")
        y = base.get("measured", {}).get("tokens_per_second_runs")
        return statistics.median(a / b for a, b in zip(x, y)) if x and y else None

    chain = by.get("c") if by.get("c", {}).get("measured") else None
    layer_gain = num_layers / oracle_layers
    if chain:
        rows.append({"row": "e: oracle exit (estimate)", "kind": "oracle", "status": "estimate",
                     "tokens_per_second": chain["tokens_per_second"] * layer_gain, "mean_layers": oracle_layers,
                     "speedup_vs_chain": layer_gain, "teacher_forced": oracle_tf,
                     "note": "not measured: row c's tokens/s x num_layers / oracle mean layers (held-out scores)"})
    base_key = "b" if by.get("b", {}).get("measured") else "c"
    base = by.get(base_key) if by.get(base_key, {}).get("measured") else None
    for r in rows:
        if r.get("measured"):
            if base:
                r["speedup"], r["speedup_baseline"] = paired(r, base), base_key
            if chain:
                r["speedup_vs_chain"] = paired(r, chain)
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


# -- report ----------------------------------------------------------------------------------------
def _f(x, fmt: str, none: str = "–") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _train_summary(t: dict) -> str:
    keys = ("train_tokens", "steps", "batch_tokens", "calib_tokens", "heldout_tokens", "rank", "loss")
    return ", ".join(f"{k} {t[k]}" for k in keys if k in t) or "unknown"


def markdown(res: dict, command: str) -> str:
    s = res["settings"]
    base = next((r.get("speedup_baseline") for r in res["rows"] if r.get("speedup_baseline")), None)
    base_name = {"b": "b (optimum/onnxruntime)", "c": "c (our chain, exits off; b missing)"}.get(base, "–")
    m, v = res["machine"], res["versions"]
    opt_v = next((r["measured"]["versions"] for r in res["rows"] if r["row"].startswith("b") and r.get("measured")),
                 None)
    lines = [
        f"# Benchmark: {res['model']} ({res['source']['model_id']})", "",
        f"`{command}`", "",
        f"{s['prompts']} held-out prompts x {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens each, greedy; "
        f"tokens/s and first-token latency are medians of {s['repeats']} timed passes (one warm-up generation "
        f"excluded; the rows take turns pass by pass); {s['threads']} thread(s) for torch and onnxruntime in "
        f"every row. Exits after layers {res['exits']} of {res['num_layers']}, "
        f"{res['head']} heads, confidence `{res['confidence']}`; the checkpoint's training: "
        + _train_summary(res.get("train_config") or {}) + ". Wall time of the whole run: "
        f"{res['wall_seconds'] / 60:.1f} min ("
        + ("checkpoint reused" if res["train_seconds"] is None else f"training {res['train_seconds']:.0f} s")
        + ", " + ("export reused" if res["export_seconds"] is None else f"export {res['export_seconds']:.0f} s")
        + f", timing {res.get('timing_seconds', 0):.0f} s).", "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['memory_gib']} GiB, {m['platform']}; load average at start {_f(m['load_average_start'][0], '.2f')}, "
        f"at end {_f(res['load_average_end'][0], '.2f')} (the cores are shared: other jobs add noise).", "",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + " (rows a, c, d)"
        + ("; row b: " + ", ".join(f"{k} {x}" for k, x in opt_v.items() if k != "python") if opt_v else ""), "",
        f"Speed-up is over row {base_name}: the median over rounds of the ratio between rows that ran back to "
        f"back (robust to load changes between rounds). Agreement and ROUGE-L are against row a's greedy tokens. "
        f"Teacher-forced columns use all {s['heldout_windows']} held-out windows of {s['seq_len']} tokens.", "",
        "| row | tokens/s (spread) | speed-up | first token (ms) | p95 token (ms) | peak RSS MB (after imports) | "
        "decided at layer | work (layer-positions vs plain) | decode work | greedy agreement | ROUGE-L | "
        "teacher-forced agreement | perplexity | share of oracle speed-up | greedy agreement vs same-precision full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r["status"] == "skipped":
            continue
        t = r.get("teacher_forced") or {}
        rss = (f"{r['peak_rss_mb']:.0f} ({r['rss_after_imports_mb']:.0f})" if r.get("peak_rss_mb") else "–")
        est = " (est.)" if r["kind"] == "oracle" else ""
        spread = (r.get("measured") or {}).get("tokens_per_second_spread")
        tps = _f(r.get("tokens_per_second"), ".1f") + (f" (±{spread:.0%})" if spread is not None else "")
        lines.append(
            f"| {r['row']} | {tps}{est} | {_f(r.get('speedup'), '.2f')}x{est} | "
            f"{_f(r.get('first_token_ms'), '.2f')} | {_f(r.get('p95_ms'), '.2f')} | {rss} | "
            f"{_f(r.get('mean_layers'), '.2f')} | {_f(r.get('work_share'), '.3f')} | "
            f"{_f(r.get('decode_work_share'), '.3f')} | "
            f"{_f(r.get('greedy_agreement'), '.3f')} | {_f(r.get('rouge_l'), '.3f')} | "
            f"{_f(t.get('agreement'), '.3f')} | {_f(t.get('perplexity'), '.2f')} | "
            f"{_f(r.get('share_of_oracle_speedup'), '.0%')} | {_f(r.get('greedy_agreement_same_precision'), '.3f')} |")
    skipped = [r for r in res["rows"] if r["status"] == "skipped"]
    if skipped:
        lines += ["", "Skipped rows:", ""] + [f"- {r['row']}: {r['reason']}" for r in skipped]
    c = res["heldout_scores_check"]
    lines += [
        "", "Notes:", "",
        "- tokens/s: decode speed after the first token, wall clock around each generate call (the runtime's "
        "rows include its incremental detokenization; transformers' rows return ids only); spread = half the "
        "range over passes, relative to the median. First token: prefill of the prompt + first token, median "
        "over prompts. With exits, the prompt's deeper layers are deferred when the first token exits early "
        "(`defer` KV policy), so part of the prefill moves into later tokens.",
        "- Peak RSS: VmHWM of the worker process (Python, libraries, model, caches); in brackets its RSS after "
        "imports, before the model was loaded. The difference is what the model and generation added.",
        "- layers/token: the depth at which each generated token was decided. With the runtime's default `defer` KV "
        "policy the positions an exit skipped are still run through the deeper layers later, batched with the "
        "next token that goes deep (that keeps the KV cache exact), so compute falls by less than this ratio; the "
        "time saved comes from fewer segment calls per token.",
        "- Greedy agreement: share of positions where the row's continuation equals row a's; after a first "
        "difference the continuations drift apart, so this is stricter than the per-token teacher-forced "
        "agreement.",
        "- Perplexity: teacher-forced on the held-out windows; each position's next-token distribution is the head "
        "of the exit the policy takes there (the full model when no exit fires).",
        f"- Row e is an estimate, not a measurement: row c's tokens/s x {res['num_layers']} / oracle layers "
        "(from the checkpoint's held-out scores). It ignores the fixed cost per token (embedding, LM head, "
        "Python), so it is optimistic. Share of oracle speed-up = (speed-up over c - 1) / (e's speed-up over c - 1); "
        "above 100% a policy is faster than the oracle only by answering wrong more often.",
        f"- Budgets (unit: {s['budget_unit']}) come from `exporter.budget.budget_thresholds` on the calibration "
        f"scores. In compute units every exit check costs {s['exit_check_cost_layers']:.2f} layers here (the head "
        f"runs the LM head), so the chain with every check costs {s['plain_chain_compute']:.2f} x the plain model "
        "and a budget <= 1 forces most tokens out early.",
        f"- Check: our held-out windows reproduce the checkpoint's heldout_scores.npz: {c.get('match')} "
        f"({', '.join(f'{k}={v}' for k, v in c.items() if k != 'match')}).",
    ]
    for prec, q in (res.get("quantization") or {}).items():
        if not q:
            continue
        c = q.get("calibration", {})
        lines.append(f"- {prec}: {q['bits']}-bit MatMulNBits weights, blocks of {q['block_size']}, "
                     f"{'symmetric' if q['symmetric'] else 'asymmetric'}, accuracy level {q['accuracy_level']}; the "
                     f"quantized full model agrees with the fp32 one on "
                     f"{_f(c.get('teacher_forced_agreement_vs_fp32'), '.3f')} of held-out tokens (teacher-forced), "
                     f"{_f(c.get('greedy_agreement_vs_fp32'), '.3f')} greedy; its exits are calibrated on its own outputs, "
                     "so its target rows are compared with the same-precision full row (last column).")
    if any(r["row"].startswith("f:") and r.get("measured") for r in res["rows"]):
        lines.append("- Row f: llama.cpp (llama-cpp-python, benchmarks/.venv-llamacpp) on the GGUF file the model ships "
                     "as (the weights rows a-d dequantize), greedy on the same token ids, same thread count.")
    if res.get("samples"):
        lines += ["", "Sample (first prompt):", "", f"- prompt: {res['samples'][0]['prompt']!r}"]
        lines += [f"- {x['row']}: {x['continuation']!r}" for x in res["samples"][1:]]
    return "\n".join(lines) + "\n"


def policy_table(res: dict, command: str) -> str:
    """Work and agreement per exit row and KV policy, with no timing columns: fit for runs on
    shared, loaded cores (their tokens/s are not comparable; these counts are deterministic)."""
    lines = [f"# KV policies: {res['model']} ({res['source']['model_id']})", "", f"`{command}`", "",
             f"{res['settings']['prompts']} held-out prompts x {res['settings']['prompt_tokens']} tokens, "
             f"{res['settings']['new_tokens']} new tokens each, greedy, exits after layers {res['exits']} of "
             f"{res['num_layers']}. Work = layer-positions run / the plain model's for the same prompt and tokens "
             "(prompt included); decode work = the steps after the first token only; owed = deferred work not run "
             "when generation stopped (same unit as work). Greedy agreement and ROUGE-L: against row a's tokens "
             "(free-running, so they see `fill`'s approximate caches); teacher-forced agreement: each exit's head "
             "on exact hidden states (blind to `fill`). Timing is left out on purpose.", "",
             "| row | KV policy | decided at layer | work | decode work | owed | K/V fills per token (layer-positions) "
             "| calls per token | rollbacks per token | greedy agreement | ROUGE-L | teacher-forced agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        m = r.get("measured") or {}
        w = m.get("work")
        if r["status"] != "ok" or not w:
            continue
        t = r.get("teacher_forced") or {}
        lines.append(f"| {r['row']} | {r.get('kv_policy', 'defer')} | {_f(r.get('mean_layers'), '.2f')} | "
                     f"{w['share']:.3f} | {w['decode_share']:.3f} | {w['owed_share']:.3f} | "
                     f"{w['fill_positions_per_token']:.2f} | {w['calls_per_token']:.2f} | "
                     f"{w['rollbacks_per_token']:.3f} | {_f(r.get('greedy_agreement'), '.3f')} | "
                     f"{_f(r.get('rouge_l'), '.3f')} | {_f(t.get('agreement'), '.3f')} |")
    return "\n".join(lines) + "\n"


def _plain(x):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"full": "s", "target": "o", "budget": "D", "oracle": "*"}
    colours = iter(plt.get_cmap("tab10").colors * 2)
    for r in res["rows"]:
        if not r.get("speedup"):
            continue
        tf = (r.get("teacher_forced") or {}).get("agreement")
        x = r.get("greedy_agreement", tf if r["kind"] == "oracle" else None)
        col = next(colours)
        label = r["row"]
        if x is not None:
            ax.scatter([x], [r["speedup"]], color=col, marker=markers.get(r["kind"], "o"),
                       s=140 if r["kind"] == "oracle" else 60, zorder=3, label=label, alpha=0.85)
        if tf is not None and r["kind"] in ("target", "budget"):
            ax.scatter([tf], [r["speedup"]], facecolors="none", edgecolors=col, marker=markers[r["kind"]], s=60,
                       zorder=3)
            if x is not None:
                ax.plot([x, tf], [r["speedup"]] * 2, color=col, lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="best")
    base = next((r.get("speedup_baseline") for r in res["rows"] if r.get("speedup_baseline")), "?")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("agreement with the full model (filled: greedy continuation vs row a; hollow: teacher-forced)")
    ax.set_ylabel(f"speed-up over row {base} (decode tokens/s)")
    ax.set_title(f"{res['model']}: speed-up vs agreement (oracle speed is an estimate)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260k", help="recipe name in models/ (default: stories260k)")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<model>)")
    p.add_argument("--work", help="checkpoint/export/optimum folder (default: runs/bench/<model>)")
    p.add_argument("--ckpt", help="existing checkpoint (default: <work>/ckpt, trained when missing)")
    p.add_argument("--export", help="per-segment export (default: <work>/onnx, exported when missing or stale)")
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
    p.add_argument("--optimum-python", default=str(OPTIMUM_PYTHON), help="python of the optimum venv")
    p.add_argument("--llamacpp-python", default=str(LLAMACPP_PYTHON), help="python of the llama.cpp venv (row f)")
    p.add_argument("--precisions", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                   help="quantized exports timed as rows g (default int8 int4; give none for no such rows)")
    p.add_argument("--quant-targets", type=float, nargs="*", default=[0.95],
                   help="agreement targets for the quantized rows (besides exits off; default 0.95)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is skipped")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or HERE / "results" / args.model)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = benchmark(args)
    out.mkdir(parents=True, exist_ok=True)
    res["command"] = command.strip()
    (out / "results.json").write_text(json.dumps(_plain(res), indent=1, allow_nan=False))
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
