"""Timing rows: one worker process per row (benchmarks/optimum_worker.py, or the script of a
backend timed elsewhere), all kept alive and taking turns pass by pass so that load from other
jobs on shared cores spreads over every row; the same turn-taking for arms timed in one process
(`paired_rounds`); medians over passes; what machine and versions the figures come from."""

from __future__ import annotations

import json
import os
import platform
import select
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "optimum_worker.py"
WORKERS = {"llamacpp": HERE / "llamacpp_worker.py"}  # backends timed by another script (same protocol)


def module_command(python: Path | str, script: Path, *args: str) -> list[str]:
    """`python -m benchmarks.NAME ARGS`: how a benchmark script runs under any python (another
    venv's included, which has no project install), with `worker_env()`'s PYTHONPATH."""
    module = ".".join(script.resolve().relative_to(ROOT).with_suffix("").parts)
    return [str(python), "-m", module, *map(str, args)]


def worker_env() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH: a worker imports the
    benchmarks package (and, for the lama rows, this checkout's runtime) from here."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class Worker:
    """One row's optimum_worker.py process, kept alive so that rows take turns pass by pass."""

    def __init__(self, key: str, python: Path, spec: dict, tmp: Path, timeout: float):
        self.key, self.timeout = key, timeout
        slug = "".join(ch if ch.isalnum() else "_" for ch in key)
        path = tmp / f"{slug}.json"
        path.write_text(json.dumps(spec))
        self.stderr = open(tmp / f"{slug}.err", "w+")
        script = WORKERS.get(spec["backend"], WORKER)
        self.proc = subprocess.Popen(module_command(python, script, path), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=worker_env())

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


def paired_rounds(arms: dict, rounds: int, desc: str = "paired rounds") -> tuple[dict[str, list[float]], dict]:
    """Arms timed in one process, taking turns: every round runs each arm once, the order rotating
    by one per round (with two arms: alternating), so that load drifting between rounds hits every
    arm alike and per-round ratios pair them. An arm is a callable running one pass and returning
    a tuple whose first item is its tokens/s. Returns ({arm: tokens/s per round}, {arm: the tuple
    of its last pass}); warm-up passes are the caller's."""
    from tqdm.auto import tqdm

    names = list(arms)
    tps: dict[str, list[float]] = {n: [] for n in names}
    last: dict = {}
    for r in tqdm(range(rounds), desc=desc, unit="round"):
        for n in names[r % len(names):] + names[:r % len(names)]:
            last[n] = arms[n]()
            tps[n].append(last[n][0])
    return tps, last


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


def ratio_interval(ratios: list[float], level: float = 0.95, draws: int = 4000) -> list[float] | None:
    """Bootstrap interval of the median per-round ratio (rounds resampled; a fixed seed, so a
    report is reproducible from its passes). It says how well the run pins the ratio down: the
    rows of a round ran back to back, so load that drifts between rounds cancels in the ratio;
    what is left is pass-to-pass noise, which more rounds shrink."""
    if len(ratios) < 3:
        return None
    x = np.asarray(ratios, dtype=float)
    idx = np.random.default_rng(0).integers(0, len(x), (draws, len(x)))
    med = np.median(x[idx], axis=1)
    lo, hi = np.quantile(med, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]
