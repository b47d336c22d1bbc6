"""The benchmark's report: results.md (the main table and its notes), kv_policies.md (work
and agreement per KV policy, no timings), the speed-up vs agreement plot, and the JSON-safe
form of the results. Reads the result dict `run.py` builds; measures nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _f(x, fmt: str, none: str = "–") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _train_summary(t: dict) -> str:
    keys = ("train_tokens", "steps", "batch_tokens", "calib_tokens", "heldout_tokens", "rank", "loss")
    return ", ".join(f"{k} {t[k]}" for k in keys if k in t) or "unknown"


def _cheapest_budget(res: dict) -> float:
    """The lowest feasible compute budget: every token at the first exit, over the chain without exits."""
    check, exits, n = res["settings"]["exit_check_cost_layers"], res["exits"], res["num_layers"]
    return (exits[0] + check) / (n + len(exits) * check)


def _check_note(res: dict) -> str:
    """What one exit check runs, in words, for the export's confidence kind."""
    if res.get("confidence") == "gate":
        return ("the check is the exit gate, a small MLP on the hidden state; the exit head with its LM head runs "
                "only for tokens that leave")
    return "the check is the exit head, whose LM head covers the whole vocabulary"


def _ratio(x: float | None, ci: list[float] | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


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
        "| row | tokens/s (spread) | speed-up [95% CI] | vs llama.cpp [95% CI] | first token (ms) | p95 token (ms) | "
        "peak RSS MB (after imports) | "
        "decided at layer | work (layer-positions vs plain) | decode work | greedy agreement | ROUGE-L | "
        "teacher-forced agreement | perplexity | share of oracle speed-up | greedy agreement vs same-precision full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {r['row']} | {tps}{est} | {_ratio(r.get('speedup'), r.get('speedup_ci95'))}{est} | "
            f"{_ratio(r.get('vs_llamacpp'), r.get('vs_llamacpp_ci95'))} | "
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
        "range over passes, relative to the median. Ratios (speed-up, vs llama.cpp) are medians of per-round "
        "ratios; [95% CI] is a bootstrap interval of that median over the rounds: a ratio whose interval holds "
        "1.00 is within noise. First token: prefill of the prompt + first token, median "
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
        f"scores. Every exit check costs {s['exit_check_cost_layers']:.2f} layers here ({_check_note(res)}), so "
        f"the chain without early exits costs {s['plain_chain_compute']:.2f} x the plain model; "
        + (f"a compute budget is a share of that chain (checks included): budget 1 turns every exit off (the full "
           f"model's output) and the feasible budgets start at {_cheapest_budget(res):.3f} (every token at the first "
           "exit)." if s['budget_unit'] == "compute" else
           f"a layers budget counts decoder layers per token only; {res['num_layers']} turns every exit off."),
        f"- Check: our held-out windows reproduce the checkpoint's heldout_scores.npz: {c.get('match')} "
        f"({', '.join(f'{k}={v}' for k, v in c.items() if k != 'match')}).",
    ]
    for prec, q in (res.get("quantization") or {}).items():
        if not q:
            continue
        c = q.get("calibration", {})
        exact = q.get("exact_blocks") or {}
        kinds = ", ".join(f"{v} {k}" for k, v in exact.items() if v)
        kept = (f"exact GGUF blocks ({kinds} weights), only the rest re-quantized" if kinds
                else "every weight re-quantized")
        lines.append(f"- {prec}: {q['method']}; {q['bits']}-bit, blocks of {q['block_size']}, "
                     f"{'symmetric' if q['symmetric'] else 'asymmetric'}, accuracy level {q['accuracy_level']}; {kept}; the "
                     f"quantized full model agrees with the fp32 one on "
                     f"{_f(c.get('teacher_forced_agreement_vs_fp32'), '.3f')} of held-out tokens (teacher-forced), "
                     f"{_f(c.get('greedy_agreement_vs_fp32'), '.3f')} greedy; its exits are calibrated on its own outputs, "
                     "so its target rows are compared with the same-precision full row (last column).")
    if any(r["row"].startswith("f:") and r.get("measured") for r in res["rows"]):
        lines.append("- Row f: llama.cpp (llama-cpp-python, benchmarks/.venv-llamacpp) on the GGUF file the model ships "
                     "as (the weights rows a-d dequantize), greedy on the same token ids, same thread count.")
    genai = next((r for r in res["rows"] if r["row"].startswith("h:") and r.get("measured")), None)
    if genai:
        lines.append(genai_note(genai["measured"]))
    if res.get("samples"):
        lines += ["", "Sample (first prompt):", "", f"- prompt: {res['samples'][0]['prompt']!r}"]
        lines += [f"- {x['row']}: {x['continuation']!r}" for x in res["samples"][1:]]
    return "\n".join(lines) + "\n"


def genai_note(measured: dict) -> str:
    """Row h's note: what onnxruntime-genai ran (its version, the builder's int4 settings)."""
    v = measured.get("versions") or {}
    info = measured.get("info") or {}
    q = (info.get("build") or {}).get("matmulnbits") or {}
    settings = (f"MatMulNBits {q['bits']}-bit, blocks of {q['block_size']}, accuracy level {q['accuracy_level']}"
                + {True: ", symmetric", False: ", asymmetric"}.get(q.get("symmetric"), "")
                if {"bits", "block_size", "accuracy_level"} <= q.keys() else "the builder's defaults")
    return (f"- Row h: onnxruntime-genai {v.get('onnxruntime-genai', '?')} (onnxruntime {v.get('onnxruntime', '?')}, "
            "benchmarks/.venv-genai) on the one int4 graph its model builder (`-p int4 -e cpu`) made from the model as "
            f"shipped, dequantized ({settings}; {info.get('onnx_mb', '?')} MB), its greedy search on the same token ids, "
            f"intra-op threads {info.get('intra_op_num_threads', '?')}; genai stops at the end-of-sequence token, "
            "so the worker feeds that token back and decodes on (the same number of steps as every row). Its "
            "fidelity to the float model: benchmarks/llamacpp_fidelity.py.")


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


def write_report(out: Path | None, name: str, res: dict, md: str) -> None:
    """A result as machines and people read it: OUT/NAME.json and OUT/NAME.md, the table printed
    (out=None: printed only, for a run without --out)."""
    import json

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        (out / f"{name}.md").write_text(md)
    print(md)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a report quotes: `python -m MODULE` (e.g. benchmarks.multitoken) and its arguments."""
    import sys

    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def plain(x):
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
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
