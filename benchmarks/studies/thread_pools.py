"""Which onnxruntime thread pool suits a chain of segments: one shared spinning pool or one per session.

    python -m benchmarks.studies.thread_pools EXPORT [EXPORT ...] [--threads 2] [--repeats 9] [--out DIR]

For each export, two rows in the same run (benchmarks/timing.py: one worker process each,
taking turns pass by pass): the chain with exits off under `thread_pool="shared"` (opt-in) and under
`thread_pool="session"` (the default). Prompts:
four fixed openings, 32 greedy tokens each. Writes thread_pools.json / .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.timing import machine_info, summarize, time_rows

PROMPTS = ["The old house at the end of the street had been empty for years, and",
           "In 1887 the city council voted to build a new bridge across the river because",
           "def parse_config(path):\n    \"\"\"Read the settings file and",
           "- Did you see the game last night?\n- I did! The second half was"]


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs") / "thread_pools")
    a = p.parse_args(argv)
    machine = machine_info()
    specs = {}
    for folder in a.exports:
        ids = [Tokenizer.from_file(str(folder / "tokenizer.json")).encode(t).ids for t in PROMPTS]
        for pool in ("shared", "session"):
            specs[f"{folder.parent.name}/{folder.name}: {pool}"] = (Path(sys.executable), {
                "backend": "lama", "export_dir": str(folder), "thresholds": "never", "prompts": ids,
                "max_new_tokens": a.new_tokens, "threads": a.threads, "thread_pool": pool})
    with tempfile.TemporaryDirectory(prefix="lama-pools-") as tmp:
        measured, failed = time_rows(specs, a.repeats, Path(tmp), 600)
    rows = []
    for key in specs:
        if key in measured:
            m = summarize(measured[key]["passes"])
            rows.append({"row": key, "tokens_per_second": m["tokens_per_second"],
                         "spread": m["tokens_per_second_spread"], "runs": m["tokens_per_second_runs"],
                         "tokens": m["tokens"]})
        else:
            rows.append({"row": key, "failed": failed.get(key)})
    res = {"threads": a.threads, "repeats": a.repeats, "new_tokens": a.new_tokens, "machine": machine,
           "rows": rows}
    lines = [f"# Thread pools: shared (spinning) vs per session, {a.threads} threads, exits off", "",
             f"4 prompts x {a.new_tokens} greedy tokens, median of {a.repeats} passes, rows taking turns; "
             f"load average before {res['machine'].get('load_average_start')}.", "",
             "| export: pool | tokens/s | spread | shared / session |", "|---|---:|---:|---:|"]
    by = {r["row"]: r for r in rows}
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['row']} | failed: {r['failed']} | | |")
            continue
        other = by.get(r["row"].replace(": shared", ": session"))
        ratio = (f"{r['tokens_per_second'] / other['tokens_per_second']:.2f}x"
                 if r["row"].endswith("shared") and other and "failed" not in other else "")
        same = " (same tokens)" if ratio and other["tokens"] == r["tokens"] else ""
        lines.append(f"| {r['row']} | {r['tokens_per_second']:.1f} | ±{100 * r['spread']:.0f}% | {ratio}{same} |")
    write_report(a.out, "thread_pools", res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
