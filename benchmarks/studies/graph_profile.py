"""Where a decode step's time goes, op by op, in single ONNX graphs: ours and onnxruntime-genai's.

    python -m benchmarks.studies.graph_profile NAME=GRAPH.onnx [NAME=GRAPH.onnx ...]
        [--steps 64] [--past 128] [--threads 2] [--out DIR]

Each graph runs one-token decode steps in plain onnxruntime (no generation loop around it), first
unprofiled (the step time to read), then with onnxruntime's profiler (kernel time per op type,
and the number of nodes that ran per step, after onnxruntime's own graph optimizations). Inputs
are made from the graph's own input list by name: token ids, an attention mask / position ids /
seqlens_k / total_sequence_length for a context of `--past` positions, KV tensors of `--past`
positions (zeros: the arithmetic, not the values, is timed), a hidden state for a graph that
starts from one. Sessions use onnxruntime's default threading (per-session pool, spinning on),
`--threads` intra-op threads, as onnxruntime-genai runs. The profiler adds a cost per node, so its
shares overweight small nodes; the unprofiled step time is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report

DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
          "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


def feeds_for(session, past: int, head_dim: int = 64) -> dict:
    """One decode step's inputs, by input name (ours: runtime/roles.py; genai: its builder's)."""
    feeds = {}
    for i in session.get_inputs():
        name, dtype = i.name, DTYPES[i.type]
        dims = [d if isinstance(d, int) else None for d in i.shape]
        if name == "input_ids":
            feeds[name] = np.array([[42]], dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + 1), dtype)
        elif name == "position_ids":
            feeds[name] = np.array([[past]], dtype)
        elif name == "seqlens_k":
            feeds[name] = np.array([past], dtype)
        elif name == "total_sequence_length":
            feeds[name] = np.array(past + 1, dtype)
        elif "key" in name or "value" in name:  # (batch, kv heads, positions, head size): room for one more
            feeds[name] = np.zeros((1, dims[1], past + 1, dims[3] or head_dim), dtype)
        elif name == "hidden":
            feeds[name] = np.zeros((1, 1, dims[2]), dtype)
        elif name == "gate_on":  # a gate behind its switch (exporter/gate_switch.py): profile it running
            feeds[name] = np.array(True)
        else:
            raise SystemExit(f"{name}: no rule to make this input")
    return feeds


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def profile(path: Path, steps: int, past: int, threads: int, head_dim: int) -> dict:
    s = _session(path, threads)
    feeds = feeds_for(s, past, head_dim)
    for _ in range(5):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(steps):
        s.run(None, feeds)
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        p = _session(path, threads, os.path.join(tmp, "prof"))
        for _ in range(5):
            p.run(None, feeds)
        for _ in range(steps):
            p.run(None, feeds)
        events = json.loads(Path(p.end_profiling()).read_text())
    per_op, nodes = defaultdict(float), set()
    runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in runs:
        per_op[e["args"]["op_name"]] += e["dur"]
        nodes.add(e["name"])
    total = steps + 5
    kernels = {k: v / total / 1e3 for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return {"graph": str(path), "step_ms_unprofiled": step_ms, "nodes_per_step": len(nodes),
            "kernel_ms_per_step": sum(kernels.values()), "kernel_ms_by_op": kernels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", help="NAME=PATH.onnx")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64, help="KV head size where a graph leaves it symbolic (genai)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    load = os.getloadavg()
    rows = {}
    for item in a.graphs:
        name, _, path = item.partition("=")
        rows[name] = profile(Path(path), a.steps, a.past, a.threads, a.head_dim)
    res = {"command": command_line("benchmarks.studies.graph_profile", argv), "steps": a.steps, "past": a.past,
           "threads": a.threads, "rows": rows, "load_average": {"start": load, "end": os.getloadavg()}}
    ops = sorted({op for r in rows.values() for op in r["kernel_ms_by_op"]},
                 key=lambda op: -max(r["kernel_ms_by_op"].get(op, 0) for r in rows.values()))
    names = list(rows)
    lines = [f"# One decode step, op by op (past {a.past}, {a.threads} threads, {a.steps} steps)", "",
             f"`{res['command']}`", "",
             f"Load average {load[0]:.2f} at start, {res['load_average']['end'][0]:.2f} at end. Kernel times come from "
             "onnxruntime's profiler, which adds a cost per node: compare the unprofiled step times.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             "| step, unprofiled (ms) | " + " | ".join(f"{rows[n]['step_ms_unprofiled']:.2f}" for n in names) + " |",
             "| nodes run per step | " + " | ".join(str(rows[n]["nodes_per_step"]) for n in names) + " |",
             "| kernels, profiled (ms) | " + " | ".join(f"{rows[n]['kernel_ms_per_step']:.2f}" for n in names) + " |"]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{rows[n]['kernel_ms_by_op'].get(op, 0):.3f}" for n in names) + " |")
    write_report(a.out, "graph_profile", res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
