"""A self-distilled n-gram drafter against prompt lookup, offline (issue 24's draft sources).

    python -m benchmarks.studies.ngram_drafter --train-cache runs/smol/cache/train --export runs/smol/onnx-fp32 [--out DIR]

Prompt lookup only drafts where the text repeats itself. A draft source that needs no network
call: a table from the last n tokens (n = 3, 2, 1) to the token the frozen model itself predicts
after them most often, counted over the hidden-state cache `lama train` already made (its
teacher top-1 at every training position: self-supervised, no labels; exporter/ngram.py, the
table `lama train` now stores). Drafting chains the table (each draft becomes context for the
next), so one draft costs a binary search (runtime/drafting.NgramTable).
Evaluated as eagle_study is: greedy continuations of held-out prompts of every domain (here
from an export, one token per call), acceptance per draft position of each source and of lookup
with the table as fallback.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.report import command_line, write_report


def continuations(export: Path, prompts: dict, new_tokens: int) -> dict:
    """{domain: [(ids, prompt length)]}: the export's greedy continuations, exits off."""
    from runtime import Runtime

    rt = Runtime.load(export)
    out = {}
    for dom, ps in prompts.items():
        out[dom] = [(np.array(p + list(rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False).tokens)), len(p))
                    for p in ps]
    return out


def main(argv=None) -> int:
    from benchmarks.studies.eagle_study import acceptance_rows, chain_accept, drafts_at, verify_points
    from exporter.data import default_data_dir, heldout_prompts
    from exporter.ngram import build_table
    from runtime.drafting import NgramTable, PromptLookup

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-cache", type=Path, required=True, help="a `lama train` hidden-state cache (token.npy, top_idx.npy)")
    ap.add_argument("--export", type=Path, required=True, help="an export of the model: its greedy continuations")
    ap.add_argument("--per-domain", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--drafts", type=int, default=5)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    tokens = np.load(a.train_cache / "token.npy")
    t0 = time.time()
    arrays = build_table(np.load(a.train_cache / "sequence.npy"), tokens,
                         np.load(a.train_cache / "top_idx.npy", mmap_mode="r")[:, 0], min_count=a.min_count)
    build_s = time.time() - t0
    table = NgramTable.from_arrays(arrays)
    prompts = heldout_prompts(a.export, [default_data_dir()], a.per_domain, a.prompt_tokens)
    conts = continuations(a.export, prompts, a.new_tokens)
    lookup, K = PromptLookup(), a.drafts
    proposers = {"lookup": lookup.propose, "ngram": table.propose,
                 # both, in the runtime's order (drafting.SOURCES): the table where lookup finds nothing
                 "lookup, else ngram": lambda h, k: lookup.propose(h, k) or table.propose(h, k)}
    sources = tuple(proposers)
    per_domain = {}
    for dom, seqs in conts.items():
        acc = {s: [] for s in sources}
        for ids, plen in seqs:
            starts, truth = verify_points(ids, plen, K)
            for s, propose in proposers.items():
                acc[s].append(chain_accept(drafts_at(propose, ids, starts, K), truth))
        per_domain[dom] = {s: np.concatenate(v).mean(0).round(4).tolist() for s, v in acc.items()}
    mean = {s: np.mean([v[s] for v in per_domain.values()], 0).round(4).tolist() for s in sources}
    res = {"command": command_line("benchmarks.studies.ngram_drafter", argv), "train_tokens": int(tokens.size),
           "table_entries": {n: len(k) for n, (k, _) in table.tables.items()}, "build_seconds": round(build_s, 1),
           "min_count": a.min_count, "drafts": K, "acceptance_by_position": per_domain, "mean": mean}
    rows = acceptance_rows(per_domain, mean, sources, K, label="source")
    md = [f"# A self-distilled n-gram drafter vs prompt lookup, greedy continuations of held-out prompts", "",
          f"`{res['command']}`", "",
          f"Table from {res['train_tokens']:,} cached training tokens (the model's own top-1 after each 3/2/1-token "
          f"context, kept when seen >= {a.min_count} times): {res['table_entries']} entries, built in {build_s:.1f} s. "
          f"{a.per_domain} prompts x {a.new_tokens} greedy tokens per domain from `{a.export}`. Acceptance: the share "
          "of positions where drafts 1..s all equal the model's greedy tokens.", ""] + rows
    write_report(a.out, "ngram_drafter", res, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
