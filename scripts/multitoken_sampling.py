"""Exact multi-token decoding with sampling: how many tokens a call makes, against greedy.

    python scripts/multitoken_sampling.py EXPORT [--data ../shared/data] [--per-domain 4]
        [--prompt-tokens 128] [--new-tokens 32] [--temperatures 0.7 1.0] [--seeds 2]
        [--threads 1] [--out DIR]

Prompts are windows of the held-out share of every domain's text (exporter/data.py), as in
benchmarks/multitoken.py. Every prompt generates `--new-tokens` tokens in exact mode with
prompt-lookup drafts and the exits off (thresholds "never"), greedy and at each temperature
(`--seeds` seeds each); per domain and arm it reports the tokens drafted and accepted, the
decoding steps and tokens per step, and graph calls per token (with sampling the last segment
checks drafted positions one call each). Each sampled exact output is also compared with plain
sampling for the same seed (the full path, one token per call): equal token for token in exact
arithmetic, so a difference marks where the export's logits move with a call's shape (int4 does
at near-ties, as in greedy exact mode). Not timed: counts only.

Writes multitoken_sampling.json into --out (default: print only).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from exporter.data import heldout_prompts


def run_arm(rt, prompts: list[list[int]], new_tokens: int, temperature: float, seeds: int) -> dict:
    tokens = steps = drafted = accepted = calls = 0
    first_drafted = first_accepted = 0
    same = outputs = 0
    for p in prompts:
        for seed in range(seeds if temperature > 0 else 1):
            res = rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False, exact=True,
                              temperature=temperature, seed=seed)
            d = res.drafts()
            lookup = d["sources"].get("lookup", {"drafted": 0, "accepted": 0})
            tokens, steps = tokens + len(res.tokens), steps + d["steps"]
            drafted, accepted = drafted + lookup["drafted"], accepted + lookup["accepted"]
            calls += sum(r.calls for r in res.records)
            # first drafted position of each drafting step: accepted when the record after it is a draft
            recs = res.records
            for i, r in enumerate(recs):
                if r.drafted.get("lookup"):
                    first_drafted += 1
            run = 0
            for r in recs:
                if r.source == "lookup":
                    run += 1
                else:
                    first_accepted += run > 0
                    run = 0
            first_accepted += run > 0
            if temperature > 0:
                plain = rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False, temperature=temperature,
                                    seed=seed)
                same += plain.tokens == res.tokens
                outputs += 1
    out = {"outputs": len(prompts) * (seeds if temperature > 0 else 1), "tokens": tokens, "steps": steps,
           "tokens_per_step": tokens / steps, "drafted": drafted, "accepted": accepted,
           "acceptance": accepted / drafted if drafted else float("nan"),
           "drafting_steps": first_drafted, "first_draft_accepted": first_accepted,
           "calls_per_token": calls / tokens}
    if temperature > 0:
        out["equal_to_plain_sampling"] = f"{same}/{outputs}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--data", type=Path, nargs="+", default=None, help="text folders (default: ../shared/data)")
    p.add_argument("--per-domain", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt for each sampled arm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from exporter.data import default_data_dir
    from runtime import Runtime

    rt = Runtime.load(a.export, threads=a.threads)
    prompts = heldout_prompts(a.export, a.data or [default_data_dir()], a.per_domain, a.prompt_tokens)
    arms = {"greedy": 0.0, **{f"temperature {t:g}": t for t in a.temperatures}}
    result = {"command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]),
              "export": str(a.export), "precision": rt.manifest.precision, "new_tokens": a.new_tokens,
              "prompt_tokens": a.prompt_tokens, "arms": {}}
    for name, t in arms.items():
        per = {dom: run_arm(rt, ps, a.new_tokens, t, a.seeds) for dom, ps in prompts.items()}
        tot = {k: sum(v[k] for v in per.values()) for k in ("tokens", "steps", "drafted", "accepted",
                                                            "drafting_steps", "first_draft_accepted")}
        tot["tokens_per_step"] = tot["tokens"] / tot["steps"]
        tot["acceptance"] = tot["accepted"] / tot["drafted"] if tot["drafted"] else float("nan")
        tot["calls_per_token"] = float(np.average([v["calls_per_token"] for v in per.values()],
                                                  weights=[v["tokens"] for v in per.values()]))
        if t > 0:
            same = [tuple(map(int, v["equal_to_plain_sampling"].split("/"))) for v in per.values()]
            tot["equal_to_plain_sampling"] = f"{sum(s for s, _ in same)}/{sum(n for _, n in same)}"
        result["arms"][name] = {"total": tot, "domains": per}
        print(f"{name}: {tot['tokens_per_step']:.2f} tokens per step, drafts accepted {tot['accepted']}/"
              f"{tot['drafted']}, first drafts {tot['first_draft_accepted']}/{tot['drafting_steps']}, "
              f"{tot['calls_per_token']:.2f} calls per token"
              + (f", equal to plain sampling {tot['equal_to_plain_sampling']}" if t > 0 else ""), flush=True)
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "multitoken_sampling.json").write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
