"""Exact multi-token decoding against what CPU users run: llama.cpp, plain and with its own
prompt-lookup decoding, in the same run on the same prompts.

    python -m benchmarks.multitoken_vs_llamacpp EXPORT [--gguf FILE] [--per-domain 2] [--rounds 15]
        [--threads 2] [--new-tokens 32] [--prompt-lookup 6] [--out DIR]

Rows, each a worker process of benchmarks/timing.py taking turns pass by pass (order rotating):
llama.cpp on the GGUF the export was made from; llama.cpp with LlamaPromptLookupDecoding; our
chain's full path (exits off, one token per call); our exact decoding with drafts (exits off).
`--plain` adds the plain model exported as one graph (`lama export --no-exits`; what segmenting
costs), `--genai-dir` onnxruntime-genai on its model builder's int4 graph (benchmarks/.venv-genai).
Prompts: `--per-domain` held-out windows of every domain (benchmarks/multitoken.py), greedy, no
EOS stop. tokens/s is decode speed (after the first token, as every row of benchmarks/run.py);
each row's ratio to llama.cpp is the median per-round ratio with a bootstrap 95% interval.
Needs benchmarks/.venv-llamacpp (setup_llamacpp.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import rows as _rows  # noqa: F401  (registers the onnxruntime-genai worker)
from benchmarks.report import command_line, write_report
from benchmarks.timing import ratio_interval, time_rows
from exporter.data import heldout_prompts

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--gguf", type=Path, help="the GGUF file (default: the recipe's, from the exporter's cache)")
    p.add_argument("--recipe", default="smollm2-135m")
    p.add_argument("--per-domain", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-lookup", type=int, default=6, help="llama.cpp's num_pred_tokens")
    p.add_argument("--draft-costs", type=float, nargs="+",
                   help="one exact + drafts row per draft_cost (default: one row, the runtime's default)")
    p.add_argument("--llamacpp-python", type=Path, default=HERE / ".venv-llamacpp" / "bin" / "python")
    p.add_argument("--genai-dir", type=Path, help="also time onnxruntime-genai on this model builder output "
                   "(benchmarks/genai_worker.py builds it there from the GGUF when missing)")
    p.add_argument("--genai-python", type=Path, default=HERE / ".venv-genai" / "bin" / "python")
    p.add_argument("--plain", type=Path, help="also time this export of the plain model as one graph "
                   "(lama export --no-exits): what the chain's segmenting costs")
    p.add_argument("--exact-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="time the exact + drafts rows (default: on)")
    p.add_argument("--thread-pools", nargs="+", default=["session"], choices=["session", "shared"],
                   help="the LAMA rows once per onnxruntime thread pool kind (Runtime.load's thread_pool; "
                        "'shared': one spinning pool for every session of the chain)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if not a.llamacpp_python.exists():
        p.error(f"{a.llamacpp_python} not found: run bash benchmarks/setup_llamacpp.sh")
    from exporter.data import default_data_dir

    gguf = a.gguf
    if gguf is None:
        from exporter.fetch import resolve_local
        from exporter.recipes import load_recipe

        folder, name = resolve_local(load_recipe(a.recipe).source)
        gguf = Path(folder) / name
    prompts = [q for ps in heldout_prompts(a.export, [default_data_dir()], a.per_domain, a.prompt_tokens).values()
               for q in ps]
    base = {"prompts": prompts, "max_new_tokens": a.new_tokens, "threads": a.threads}
    me = Path(sys.executable)
    specs = {"llama.cpp": (a.llamacpp_python, dict(base, backend="llamacpp", gguf_path=str(gguf))),
             "llama.cpp + prompt lookup": (a.llamacpp_python, dict(base, backend="llamacpp", gguf_path=str(gguf),
                                                                   prompt_lookup=a.prompt_lookup)),
             }
    for pool in a.thread_pools:
        tag = "" if pool == "session" else f" [{pool} pool]"
        lama = dict(base, backend="lama", thresholds="never", thread_pool=pool)
        specs[f"LAMA full path{tag}"] = (me, dict(lama, export_dir=str(a.export)))
        for c in (a.draft_costs or [None]) if a.exact_rows else []:
            specs[f"LAMA exact + drafts{'' if c is None else f' (draft_cost {c:g})'}{tag}"] = (
                me, dict(lama, export_dir=str(a.export), exact=True, **({} if c is None else {"draft_cost": c})))
        if a.plain is not None:
            specs[f"LAMA plain graph{tag}"] = (me, dict(lama, export_dir=str(a.plain)))
            if a.exact_rows:
                specs[f"LAMA plain graph, exact + drafts{tag}"] = (me, dict(lama, export_dir=str(a.plain), exact=True))
    if a.genai_dir is not None:
        if not a.genai_python.exists():
            p.error(f"{a.genai_python} not found: run bash benchmarks/setup_genai.sh")
        specs["onnxruntime-genai"] = (a.genai_python, dict(base, backend="genai", genai_dir=str(a.genai_dir),
                                                           model_path=str(gguf.parent), gguf_file=gguf.name))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows, failed = time_rows(specs, a.rounds, Path(tmp), timeout=900)
    ref = rows.get("llama.cpp")
    others = [k for k in ("onnxruntime-genai", "LAMA plain graph", "LAMA plain graph [shared pool]")
              if k in rows]  # more references, if timed
    out = {}

    def per_round(tps, reference):  # this row's speed over the reference's, round by round
        return [x / y for x, y in zip(tps, (q["tokens_per_second"] for q in reference["passes"]))]

    for k, r in rows.items():
        tps = [x["tokens_per_second"] for x in r["passes"]]
        ratios = per_round(tps, ref) if ref else []
        full = next((rows[k] for k in rows if k.startswith("LAMA full path")), None)  # the first pool's
        same = (sum(t == u for t, u in zip(r["passes"][-1]["tokens"], full["passes"][-1]["tokens"]))
                if full else None)
        vs = {o: {"ratio": float(np.median(q)), "ci95": ratio_interval(q)}
              for o in others if o != k for q in [per_round(tps, rows[o])]}
        out[k] = {"tokens_per_second": float(np.median(tps)), "spread": float((max(tps) - min(tps)) / 2 / np.median(tps)),
                  "vs_llamacpp": float(np.median(ratios)) if ratios else None,
                  "vs_llamacpp_ci95": ratio_interval(ratios) if ratios else None, "vs": vs,
                  "same_tokens_as_lama_full": f"{same}/{len(prompts)}" if same is not None else None,
                  "passes": tps, "versions": r.get("versions")}
    res = {"command": command_line("benchmarks.multitoken_vs_llamacpp", argv),
           "export": str(a.export), "gguf": gguf.name, "prompts": len(prompts), "new_tokens": a.new_tokens,
           "threads": a.threads, "rounds": a.rounds, "rows": out, "failed": failed,
           "load_average": {"start": load, "end": os.getloadavg()}}
    lines = [f"# Exact multi-token decoding vs llama.cpp: {a.export}", "", f"`{res['command']}`", "",
             f"{len(prompts)} held-out prompts ({a.prompt_tokens} tokens, {a.per_domain} per domain) x {a.new_tokens} "
             f"greedy tokens, {a.threads} threads, {a.rounds} rounds with the rows taking turns; decode tokens/s "
             f"(after the first token). Load average {load[0]:.2f} at start, {res['load_average']['end'][0]:.2f} at end.",
             "", "| row | tokens/s (median) | spread | vs llama.cpp [95% CI] | "
             + "".join(f"vs {o} [95% CI] | " for o in others) + "same tokens as LAMA full path |",
             "|---|---:|---:|---:|" + "---:|" * len(others) + "---:|"]

    def cell(ratio, ci):
        return "–" if ratio is None else f"{ratio:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    for k, r in out.items():
        extra = "".join(cell(r["vs"][o]["ratio"], r["vs"][o]["ci95"]) + " | " if o in r["vs"] else "– | "
                        for o in others)
        lines.append(f"| {k} | {r['tokens_per_second']:.1f} | ±{r['spread']:.0%} | "
                     f"{cell(r['vs_llamacpp'], r['vs_llamacpp_ci95'])} | {extra}{r['same_tokens_as_lama_full']} |")
    if failed:
        lines += ["", "Failed rows: " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    md = "\n".join(lines) + "\n"
    write_report(a.out, "vs_llamacpp", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
