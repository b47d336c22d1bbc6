"""What an exit decision costs: learned gates vs. a full-vocabulary head at every exit (issue 7).

    python -m benchmarks.studies.exit_cost --model smollm2-135m --ckpt runs/bench/smollm2/ckpt

One run, three parts, all on onnxruntime CPU with the same threads:

1. Cost per check, measured on one decoder layer exported three times: the layer alone, the
   layer + its exit gate (score on the last position), the layer + its exit head (adapter,
   final norm, LM head, top-1 and confidence). The check's cost is the difference to the layer
   alone (median over interleaved rounds). Also shown: multiply-adds per token, and the head
   and gate as separate graphs (what the runtime calls on exit, ORT call overhead included).
2. Runtime speed on held-out prompts at the same agreement target: the checkpoint exported
   twice, once with in-graph heads (confidence top1: every segment runs its head) and once in
   gate mode (segments output the gate score; the head graph runs only for the leaving token).
   Rows take turns pass by pass; tokens/s is the median over passes; greedy agreement is
   against the full model's tokens.
3. Agreement vs. average compute on the stored held-out scores for both scores (thresholds
   fitted on the calibration scores for a grid of targets), plus the oracle.

Writes exit_cost.json, exit_cost.md and exit_cost.png into --out
(default benchmarks/results/<model>/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.quality import position_agreement
from benchmarks.report import command_line, write_report
from benchmarks.run import pick_prompts
from benchmarks.timing import machine_info, main_versions

ROOT = Path(__file__).resolve().parents[2]

TARGETS = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


# -- part 1: one layer with and without its check ----------------------------------------------
def layer_graphs(bb, heads, gates, k: int, folder: Path, past: int) -> dict[str, Path]:
    """ONNX graphs of decoder layer (exit k's layer - 1) alone, + gate k, + head k."""
    import torch
    from torch import nn

    from exporter.families import LayerCache, causal_mask
    from exporter.heads import confidence

    layer = heads.exits[k] - 1
    shape = bb.family.shape()
    for param in [*heads.parameters(), *gates.parameters()]:  # frozen: traced as initializers
        param.requires_grad_(False)

    class LayerCheck(nn.Module):
        def __init__(self, check: str):
            super().__init__()
            self.check = check
            self.block = bb.family.layers[layer]

        def forward(self, hidden, attention_mask, position_ids, past_key, past_value):
            mask = causal_mask(attention_mask, hidden.shape[1], hidden.dtype)
            pos = bb.family.position_embeddings(hidden, position_ids)
            cache = LayerCache(layer, [(past_key, past_value)])
            hidden = bb.family.run_layer(layer, hidden, mask, position_ids, pos, cache)
            (key, value), = cache.presents()
            outs = [hidden, key, value]
            if self.check == "gate":
                outs.append(gates.score(k, hidden[:, -1, :]))
            elif self.check == "head":
                outs += list(confidence(heads.logits(k, hidden[:, -1, :]), "top1"))
            return tuple(outs)

    class Gate(nn.Module):
        def forward(self, h):
            return gates.score(k, h)

    class Head(nn.Module):
        def forward(self, h):
            return confidence(heads.logits(k, h), "top1")

    D, kv, hd = shape.hidden_size, shape.num_kv_heads, shape.head_dim
    # trace with sequence > 1 and past > 0 (see KNOWN.md), run at sequence 1
    args = (torch.randn(1, 2, D), torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]]),
            torch.randn(1, kv, 3, hd), torch.randn(1, kv, 3, hd))
    names = ["hidden", "attention_mask", "position_ids", "past_key", "past_value"]
    axes = {"hidden": {1: "seq"}, "attention_mask": {1: "total"}, "position_ids": {1: "seq"},
            "past_key": {2: "past"}, "past_value": {2: "past"}}
    out: dict[str, Path] = {}
    folder.mkdir(parents=True, exist_ok=True)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for check in ("none", "gate", "head"):
            path = out[f"layer + {check}" if check != "none" else "layer"] = folder / f"layer_{check}.onnx"
            extra = {"none": [], "gate": ["score"], "head": ["token", "confidence"]}[check]
            torch.onnx.export(LayerCheck(check).eval(), args, str(path), input_names=names,
                              output_names=["hidden_out", "present_key", "present_value"] + extra,
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        for name, module, outs in (("gate alone", Gate(), ["score"]), ("head alone", Head(), ["token", "confidence"])):
            path = out[name] = folder / f"{name.split()[0]}.onnx"
            torch.onnx.export(module.eval(), (torch.randn(1, D),), str(path), input_names=["h"], output_names=outs,
                              opset_version=17, dynamo=False)
    feeds_layer = {"hidden": np.random.default_rng(0).standard_normal((1, 1, D)).astype(np.float32),
                   "attention_mask": np.ones((1, past + 1), np.int64), "position_ids": np.array([[past]]),
                   "past_key": np.random.default_rng(1).standard_normal((1, kv, past, hd)).astype(np.float32),
                   "past_value": np.random.default_rng(2).standard_normal((1, kv, past, hd)).astype(np.float32)}
    feeds_h = {"h": feeds_layer["hidden"][:, 0]}
    return {name: (path, feeds_h if "alone" in name else feeds_layer) for name, path in out.items()}


def time_graphs(graphs: dict, threads: int, rounds: int, calls: int) -> dict[str, dict]:
    """Median (over interleaved rounds) of the mean seconds per call of each graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime does
    sessions = {}
    for name, (path, feeds) in graphs.items():
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: feeds[i.name] for i in s.get_inputs()}
        for _ in range(20):
            s.run(None, feeds)
        sessions[name] = (s, feeds)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(rounds):
        order = list(sessions)
        order = order[r % len(order):] + order[:r % len(order)]
        for name in order:
            s, feeds = sessions[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds)
            samples[name].append((time.perf_counter() - t0) / calls)
    layer = samples["layer"]
    res = {}
    for name, xs in samples.items():
        diff = [a - b for a, b in zip(xs, layer)]  # paired with the same round's plain layer
        res[name] = {"ms": statistics.median(xs) * 1e3, "minus_layer_ms": statistics.median(diff) * 1e3,
                     "spread": (max(xs) - min(xs)) / 2 / statistics.median(xs)}
    return res


# -- part 2: runtime speed, in-graph heads vs. gates --------------------------------------------
def ensure_exports(ckpt: Path, work: Path, target: float) -> dict[str, Path]:
    """The same checkpoint exported with in-graph heads (top1) and in gate mode."""
    from exporter import api
    from exporter.checkpoint import read_config

    config = read_config(ckpt)
    out = {}
    for kind in (config.head_confidence, "gate"):
        folder = work / f"onnx-{kind}"
        manifest = folder / "manifest.json"
        fresh = manifest.is_file() and manifest.stat().st_mtime >= (ckpt / "heads.safetensors").stat().st_mtime
        if fresh:
            m = json.loads(manifest.read_text())["calibration"]
            fresh = m["confidence"] == kind and m["policy"].get("target") == target
        if not fresh:
            api.calibrate(ckpt, target=target, confidence=kind)
            api.export(ckpt, out=folder)
        out[kind] = folder
    return out


def time_runtimes(exports: dict[str, Path], prompts, new_tokens: int, target: float, threads: int,
                  repeats: int) -> list[dict]:
    from runtime import Runtime

    rows = []
    for kind, folder in exports.items():
        rt = Runtime.load(folder, threads=threads)
        label = "in-graph head at every exit" if kind != "gate" else "gate, head on exit only"
        rows.append({"row": f"{label}: exits off", "kind": kind, "runtime": rt, "thresholds": "never"})
        rows.append({"row": f"{label}: target {target:g}", "kind": kind, "runtime": rt, "thresholds": target})
    for row in rows:  # warm-up, and the tokens each row produces (greedy: the same every pass)
        rt = row["runtime"]
        rt.generate(prompts[0], 4, thresholds=row["thresholds"], stop_at_eos=False)
        results = [rt.generate(p, new_tokens, thresholds=row["thresholds"], stop_at_eos=False) for p in prompts]
        row["tokens"] = [list(r.tokens) for r in results]
        row["layers_per_token"] = float(np.mean([r.mean_layers for r in results]))
        row["passes"] = []
    for r in range(repeats):
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        for row in order:
            decode_s, decoded = 0.0, 0
            for p in prompts:
                res = row["runtime"].generate(p, new_tokens, thresholds=row["thresholds"], stop_at_eos=False)
                decode_s += sum(rec.seconds for rec in res.records[1:])
                decoded += len(res.records) - 1
            row["passes"].append(decoded / decode_s)
    reference = rows[0]["tokens"]  # in-graph heads, exits off: the full model (parity-tested)
    for row in rows:
        row["tokens_per_s"] = statistics.median(row["passes"])
        row["spread"] = (max(row["passes"]) - min(row["passes"])) / 2 / row["tokens_per_s"]
        row["greedy_agreement"] = float(np.mean([position_agreement(a, b) for a, b in zip(reference, row["tokens"])]))
        del row["runtime"]
    base = rows[1]["tokens_per_s"]  # the in-graph-head runtime at the target
    for row in rows:
        row["speedup_vs_head_at_target"] = row["tokens_per_s"] / base
    return rows


# -- part 3: agreement vs. compute from stored scores -------------------------------------------
def curves(ckpt: Path) -> dict:
    from exporter.calibrate import calibrate_thresholds
    from exporter.checkpoint import read_config, read_scores
    from exporter.scores import oracle, simulate

    config = read_config(ckpt)
    out = {}
    for kind, label in (("head", config.head_confidence), ("gate", "gate")):
        cal, held = read_scores(ckpt, "calibration", kind), read_scores(ckpt, "heldout", kind)
        points = []
        for t in TARGETS:
            o = simulate(held, calibrate_thresholds(cal, t))
            points.append({"target": t, "agreement": o.agreement, "layers": o.layers, "compute": o.compute})
        out[label] = {"check_cost_layers": held.check_cost, "points": points}
    o = oracle(read_scores(ckpt, "heldout"))
    out["oracle"] = {"layers": o.layers, "agreement": 1.0}
    out["num_layers"] = config.num_layers
    return out


# -- report ------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    c, m = res["check_costs"], res["macs"]
    lines = [f"# Exit check cost: {res['model']}", "", f"`{res['command']}`", "",
             f"Machine: {res['machine'].get('cpu', '?')}, {res['threads']} onnxruntime thread(s); "
             f"wall time {res['wall_seconds'] / 60:.1f} min. Checkpoint training: {res['train']}.", "",
             f"## 1. Cost of one check vs. one decoder layer (layer {res['layer']}, exit {res['exit_layer']}, "
             f"decode step with {res['past']} cached positions; median of {res['rounds']} interleaved rounds "
             f"x {res['calls']} calls)", "",
             "| graph | ms per call | check cost (ms, minus the plain layer) | check / layer (measured) | "
             "multiply-adds per token | check / layer (MACs) |", "|---|---:|---:|---:|---:|---:|"]
    layer_ms = c["layer"]["ms"]
    macs_of = {"layer": m["layer"], "layer + gate": m["gate"], "layer + head": m["head"],
               "gate alone": m["gate"], "head alone": m["head"]}
    for name, v in c.items():
        check = "–" if name == "layer" else f"{v['minus_layer_ms']:.4f}" if "+" in name else "–"
        ratio = (v["minus_layer_ms"] / layer_ms if "+" in name else v["ms"] / layer_ms if "alone" in name else 1.0)
        mac_ratio = macs_of[name] / m["layer"]
        lines.append(f"| {name} | {v['ms']:.4f} (±{v['spread']:.0%}) | {check} | {ratio:.1%} | "
                     f"{macs_of[name]:,} | {mac_ratio:.2%} |")
    lines += ["", "Rows 'alone' are separate graphs: their time includes onnxruntime's per-call overhead, "
              "which the runtime pays once per leaving token for the head graph.", "",
              f"## 2. Runtime on {res['prompts']} held-out prompts x {res['new_tokens']} new tokens "
              f"(median of {res['repeats']} passes, rows take turns)", "",
              "| row | tokens/s (spread) | vs. in-graph heads at target | layers/token | greedy agreement |",
              "|---|---:|---:|---:|---:|"]
    for r in res["runtime"]:
        lines.append(f"| {r['row']} | {r['tokens_per_s']:.1f} (±{r['spread']:.0%}) | "
                     f"{r['speedup_vs_head_at_target']:.2f}x | {r['layers_per_token']:.2f} | {r['greedy_agreement']:.3f} |")
    lines += ["", "## 3. Agreement vs. average compute on held-out tokens (thresholds fitted on calibration)", "",
              "| score | target | agreement | layers/token | compute incl. checks |", "|---|---:|---:|---:|---:|"]
    cv = res["curves"]
    for kind in [k for k in cv if k not in ("oracle", "num_layers")]:
        for p in cv[kind]["points"]:
            lines.append(f"| {kind} (check = {cv[kind]['check_cost_layers']:.3f} layers) | {p['target']:g} | "
                         f"{p['agreement']:.4f} | {p['layers']:.2f} | {p['compute']:.3f} |")
    lines.append(f"| oracle | – | 1.0000 | {cv['oracle']['layers']:.2f} | – |")
    lines += ["", "Compute is a fraction of the plain model; it counts each check passed on the way "
              "(a full head costs many layers, a gate a fraction of one), which is why in-graph heads "
              "can cost more than the plain model."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cv = res["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in [k for k in cv if k not in ("oracle", "num_layers")]:
        pts = cv[kind]["points"]
        ax.plot([p["compute"] for p in pts], [p["agreement"] for p in pts], marker="o", label=f"{kind} (with check cost)")
    ax.axvline(cv["oracle"]["layers"] / cv["num_layers"], color="gray", ls="--", label="oracle layers (no checks)")
    ax.set_xlabel("average compute (fraction of the plain model)")
    ax.set_ylabel("agreement with the full model (held-out)")
    ax.legend(fontsize=8)
    ax.set_title(res["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ckpt", help="checkpoint with gates (default: runs/bench/<model>/ckpt)")
    p.add_argument("--work", help="exports go to <work>/onnx-top1 and <work>/onnx-gate (default: checkpoint's parent)")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<model>)")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--past", type=int, default=64, help="cached positions in the per-check timing")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    from exporter.backbone import load_backbone
    from exporter.checkpoint import load_gates, load_heads, read_config
    from exporter.data import default_data_dir, make_splits, read_texts
    from exporter.train import check_cost, layer_macs

    ckpt = Path(args.ckpt or ROOT / "runs" / "bench" / args.model / "ckpt")
    work = Path(args.work) if args.work else ckpt.parent
    out = Path(args.out or ROOT / "benchmarks" / "results" / args.model)
    config = read_config(ckpt)
    bb = load_backbone(config.source)
    heads, gates = load_heads(ckpt, bb, config), load_gates(ckpt, bb, config)
    k = len(config.exits) // 2
    torch.set_num_threads(args.threads)
    graphs = layer_graphs(bb, heads, gates, k, work / "exit-cost-graphs", args.past)
    costs = time_graphs(graphs, args.threads, args.rounds, args.calls)
    lm = layer_macs(bb)
    macs = {"layer": lm, "gate": gates.macs(), "head": round(check_cost(bb, heads, "top1") * lm)}
    cfg = config.train["config"]
    splits = make_splits(read_texts([default_data_dir()]), bb.tokenizer, cfg["seq_len"],
                         {s: cfg[f"{s}_tokens"] for s in ("train", "calib", "heldout")}, seed=cfg["seed"])
    prompts = pick_prompts(splits["heldout"].ids, args.prompts, args.prompt_tokens)
    del bb, heads, gates
    exports = ensure_exports(ckpt, work, args.target)
    rows = time_runtimes(exports, prompts, args.new_tokens, args.target, args.threads, args.repeats)
    res = {"model": args.model, "command": command_line("benchmarks.studies.exit_cost", argv),
           "machine": machine_info(), "versions": main_versions(), "threads": args.threads,
           "train": ", ".join(f"{key} {cfg[key]}" for key in ("train_tokens", "steps", "rank", "gate_width")),
           "layer": config.exits[k] - 1, "exit_layer": config.exits[k], "past": args.past, "rounds": args.rounds,
           "calls": args.calls, "check_costs": costs, "macs": macs, "prompts": len(prompts),
           "new_tokens": args.new_tokens, "repeats": args.repeats, "runtime": rows, "curves": curves(ckpt)}
    res["wall_seconds"] = time.perf_counter() - t_start
    write_report(out, "exit_cost", res, markdown(res))
    plot(res, out / "exit_cost.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
