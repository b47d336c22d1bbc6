"""Exact multi-token decoding on an export: how often drafts are accepted, and does it pay?

    python -m benchmarks.multitoken EXPORT [--data ../shared/data] [--per-domain 8]
        [--prompt-tokens 128] [--new-tokens 32] [--rounds 15] [--timed-per-domain 2]
        [--threads 2] [--draft-tokens 6] [--draft-cost C] [--versus EXPORT [--versus-draft-cost C]] [--out DIR]

Prompts are windows of the held-out share of every domain's text (exporter/data.py: the
part of each document that training and calibration never draw from). Two parts:

1. Acceptance (not timed; greedy, so deterministic): every prompt generates `--new-tokens`
   tokens in exact mode with each draft source; per domain, tokens drafted and accepted,
   acceptance per draft position (position i counts when positions < i were accepted), and
   the mean tokens each decoding step made. Every exact output is checked against the same
   export's full path (token for token).
2. Speed (timed, paired): the export's full path (exits off, one token per call) against
   exact decoding with drafts (exits off), and with drafts and the calibrated exits, taking
   turns within each round (order rotating); the verdict is the median per-round ratio with
   a bootstrap 95% interval (timing.ratio_interval), on `--timed-per-domain` prompts of each
   domain. Load average is recorded: time only on quiet cores.

Writes multitoken.json and multitoken.md into --out (default: print only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from exporter.data import heldout_prompts

from benchmarks.report import command_line, write_report
from benchmarks.timing import paired_rounds, ratio_interval

ARMS = {"full path": dict(thresholds="never"),
        "exact + drafts, exits off": dict(thresholds="never", exact=True),
        "exact + drafts + exits": dict(exact=True)}
LOOKUP_ONLY = {"exact + lookup only, exits off": dict(thresholds="never", exact=True, drafts="lookup")}


def arms_for(rt) -> dict:
    """ARMS, plus lookup alone where the export holds other draft sources (their gain, same run)."""
    return {**ARMS, **(LOOKUP_ONLY if getattr(rt, "draft_sources", None) else {})}


def sources_of(rt) -> list[str]:
    return ["lookup"] + sorted(getattr(rt, "draft_sources", {}))


def draft_positions(records, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(drafted, accepted) per draft position: a step that drafted d tokens of which the first
    m were accepted counts positions 0..d-1 as drafted and 0..m-1 as accepted."""
    drafted, accepted = np.zeros(64, int), np.zeros(64, int)
    run = 0  # accepted drafts of `source` since the last step's record
    for r in records:
        if r.source == source:
            run += 1
            continue
        d = r.drafted.get(source, 0)
        drafted[:d] += 1
        accepted[:min(run, d)] += 1
        run = 0
    return drafted, accepted


def _logits_after(rt, ids: list[int], split: int) -> np.ndarray:
    """The full model's logits (top-k spread over the vocabulary) after `ids`, computed as a
    prefill of ids[:split] then one call per remaining token (split = len(ids): the prefill's)."""
    never = [float("inf")] * len(rt.manifest.exits)
    cache = rt.new_cache()
    _, _, _, logits = rt.step(np.asarray(ids[:split]), cache, never, want_logits=True)
    for t in ids[split:]:
        _, _, _, logits = rt.step(np.asarray([t]), cache, never, want_logits=True)
    return logits[0]


def top2_gap(logits: np.ndarray) -> float:
    a, b = np.sort(logits[np.isfinite(logits)])[-2:]
    return float(b - a)


def batching_noise(rt, prompts: list[list[int]], tail: int = 4) -> float:
    """How much the export's own logits move with the shape of the call: the largest difference
    (over the top-k both report) between prefilling a prompt whole and feeding its last `tail`
    tokens one call each. Greedy choices closer than this can flip with how positions are batched."""
    worst = 0.0
    for p in prompts:
        whole, steps = _logits_after(rt, p, len(p)), _logits_after(rt, p, len(p) - tail)
        both = np.isfinite(whole) & np.isfinite(steps)
        worst = max(worst, float(np.abs(whole[both] - steps[both]).max()))
    return worst


def acceptance(rt, prompts: dict[str, list[list[int]]], new_tokens: int, drafting: dict) -> dict:
    """`drafting`: generate's draft options for exact decoding (draft_tokens, draft_cost)."""
    from tqdm.auto import tqdm

    out, mismatches, gaps, vs_padded = {}, 0, [], 0
    for domain, ps in tqdm(prompts.items(), desc="acceptance", unit="domain"):
        per_source = {src: (np.zeros(64, int), np.zeros(64, int)) for src in sources_of(rt)}
        tokens = steps = 0
        for p in ps:
            full = rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False)
            res = rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False, exact=True, **drafting)
            # the full model with every call over >= 2 positions (KV buffer: padded one-position calls)
            padded = rt.generate(p, new_tokens, thresholds="never", stop_at_eos=False, exact=True, drafts="none")
            vs_padded += res.tokens != padded.tokens
            if res.tokens != full.tokens:  # where, and how close the full path's own choice was there
                mismatches += 1
                i = next(k for k, (x, y) in enumerate(zip(res.tokens, full.tokens)) if x != y)
                gaps.append(top2_gap(_logits_after(rt, list(p) + list(full.tokens[:i]), len(p))))
            for src, (drafted, accepted) in per_source.items():
                d, a = draft_positions(res.records, src)
                drafted += d
                accepted += a
            tokens += len(res.tokens)
            steps += res.drafts()["steps"]
        out[domain] = {"prompts": len(ps), "tokens": tokens, "steps": steps, "tokens_per_step": tokens / steps,
                       "sources": {}}
        for src, (drafted, accepted) in per_source.items():
            k = int(np.max(np.flatnonzero(drafted), initial=-1)) + 1
            out[domain]["sources"][src] = {"drafted": int(drafted.sum()), "accepted": int(accepted.sum()),
                                           "drafted_at": drafted[:k].tolist(), "accepted_at": accepted[:k].tolist()}
    firsts = [q[0] for q in prompts.values()]
    return {"domains": out, "outputs": sum(len(v) for v in prompts.values()), "mismatches": int(mismatches),
            "mismatches_vs_padded": int(vs_padded), "row_invariant": rt.manifest.row_invariant,
            "mismatch_top2_gaps": gaps, "batching_noise": batching_noise(rt, firsts)}


def call_cost(rt, prompt: list[int], sizes=(1, 2, 3, 4, 6, 8), reps: int = 30) -> dict:
    """Milliseconds of one whole-chain call over S positions after `prompt` (median of `reps`,
    sizes taking turns), and each over S=1: what a drafted position costs on this machine."""
    never = [float("inf")] * len(rt.manifest.exits)
    cache = rt.new_cache()
    rt.step(np.asarray(prompt), cache, never)
    rt.flush(cache)
    p = cache.position
    ids = np.asarray(prompt[:max(sizes)])
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(reps):
        for s in sizes:
            t0 = time.perf_counter()
            rt.step(ids[:s], cache, never)
            times[s].append(time.perf_counter() - t0)
            cache.truncate(p)
    ms = {s: 1e3 * float(np.median(v)) for s, v in times.items()}
    return {"past": p, "ms": ms, "over_one": {s: ms[s] / ms[sizes[0]] for s in sizes}}


def one_pass(rt, prompts, new_tokens: int, options: dict) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = [rt.generate(p, new_tokens, stop_at_eos=False, **options) for p in prompts]
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - t0), results


VERSUS = {"full path": dict(thresholds="never"), "exact + drafts, exits off": dict(thresholds="never", exact=True)}


def speed(rt, prompts: list[list[int]], new_tokens: int, rounds: int, drafting: dict, versus=None,
          versus_drafting: dict | None = None) -> dict:
    """Paired rounds of every arm; `versus` (another export's Runtime, e.g. the same checkpoint in
    another KV layout, or the same export with other draft options `versus_drafting`) adds its full
    path and exact decoding to the same rounds, as rows "versus: ..."."""
    def with_drafts(v, options):
        return dict(v, **(options if v.get("exact") else {}))

    arms = {k: (rt, with_drafts(v, drafting)) for k, v in arms_for(rt).items()}
    if versus is not None:
        arms.update({f"versus: {k}": (versus, with_drafts(v, versus_drafting or drafting)) for k, v in VERSUS.items()})
    names = list(arms)
    for n in names:  # warm-up, not timed
        one_pass(arms[n][0], prompts[:1], new_tokens, arms[n][1])
    load_start = os.getloadavg()
    tps, passes = paired_rounds({n: (lambda n=n: one_pass(arms[n][0], prompts, new_tokens, arms[n][1]))
                                 for n in names}, rounds)
    last = {n: passes[n][1] for n in names}  # each arm's results in the last round
    base = names[0]
    same = {n: [a.tokens == b.tokens for a, b in zip(last[base], last[n])] for n in names}
    rows = {}
    for n in names:
        ratios = [y / x for x, y in zip(tps[base], tps[n])]
        d = [r.drafts() for r in last[n]]
        steps = sum(x["steps"] for x in d)
        if versus is not None:
            other = [y / x for x, y in zip(tps["versus: full path"], tps[n])]
            extra = {"vs_versus_full": float(np.median(other)), "vs_versus_full_ci95": ratio_interval(other)}
        else:
            extra = {}
        rows[n] = {**extra, "tokens_per_second": float(np.median(tps[n])),
                   "spread": float((max(tps[n]) - min(tps[n])) / 2 / np.median(tps[n])),
                   "vs_full": float(np.median(ratios)), "vs_full_ci95": ratio_interval(ratios),
                   "tokens_per_step": sum(len(r.tokens) for r in last[n]) / steps if steps else None,
                   "same_tokens_as_full": f"{sum(same[n])}/{len(same[n])}",
                   "layer_positions_per_token": float(np.mean([r.work()["per_token"] for r in last[n]])),
                   "passes": tps[n]}
    return {"rows": rows, "rounds": rounds, "prompts": len(prompts),
            "versus": str(versus.folder) if versus is not None else None,
            "load_average": {"start": load_start, "end": os.getloadavg()}}


def _exactness(a: dict) -> str:
    head = f"Exact outputs that differ from the full path: {a['mismatches']} of {a['outputs']}."
    if "mismatches_vs_padded" in a:
        head += (f" From the full path with every call over >= 2 positions (`exact=True, drafts=\"none\"`; "
                 f"on a KV-buffer export one-position calls carry the position before them): "
                 f"{a['mismatches_vs_padded']} of {a['outputs']}. Graphs row-invariant (manifest): "
                 f"{'yes' if a.get('row_invariant') else 'no'}.")
    if not a["mismatches"]:
        return head
    return (head + f" At each first difference the full path's top-2 logit gap was at most "
            f"{max(a['mismatch_top2_gaps']):.3f} (median {np.median(a['mismatch_top2_gaps']):.3f}); the export's own "
            f"logits move by up to {a['batching_noise']:.3f} with the shape of the call (a prompt prefilled whole vs "
            "its last 4 tokens fed one by one), so these are near-ties that the full path itself decides "
            "differently when batched differently.")


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"# Exact multi-token decoding: {s['export']}", "",
             f"Held-out windows of every domain, {s['prompt_tokens']}-token prompts, {s['new_tokens']} greedy tokens, "
             f"at most {s['draft_tokens']} drafted per call, draft cost "
             f"{s['draft_cost'] if s.get('draft_cost') is not None else 'the runtime default'}, {s['threads']} "
             f"thread(s). Command: `{res['command']}`", "",
             "## Acceptance of drafts, every source the export holds (exits off)", "",
             _exactness(res["acceptance"]), "",
             "| domain | prompts | tokens per step | source | drafted | accepted | acceptance by draft position 1, 2, ... |",
             "|---|---:|---:|---|---:|---:|---|"]
    for dom, a in res["acceptance"]["domains"].items():
        for src, b in a["sources"].items():
            per = " ".join(f"{x / y:.2f}" if y else "-" for x, y in zip(b["accepted_at"], b["drafted_at"]))
            lines.append(f"| {dom} | {a['prompts']} | {a['tokens_per_step']:.2f} | {src} | {b['drafted']} | "
                         f"{b['accepted']} | {per} |")
    cc = res.get("call_cost")
    if cc:
        lines += ["", f"## Cost of one whole-chain call over S positions (after {cc['past']} positions; median)", "",
                  "| S | " + " | ".join(str(k) for k in cc["ms"]) + " |", "|---|" + "---:|" * len(cc["ms"]),
                  "| ms | " + " | ".join(f"{v:.2f}" for v in cc["ms"].values()) + " |",
                  "| over S=1 | " + " | ".join(f"{v:.2f}" for v in cc["over_one"].values()) + " |"]
    sp = res.get("speed")
    if sp:
        la = sp["load_average"]
        lines += ["", f"## Speed: {sp['rounds']} paired rounds over {sp['prompts']} prompts "
                      f"(load average {la['start'][0]:.2f} at start, {la['end'][0]:.2f} at end)", "",
                  "| row | tokens/s (median) | spread | vs full path [95% CI] | tokens per step | same tokens as full | layer-positions per token |"
                  + (" vs versus: full path [95% CI] |" if sp.get("versus") else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if sp.get("versus") else "")]

        def ratio(r, key):
            ci = r[key + "_ci95"]
            return f"{r[key]:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

        for n, r in sp["rows"].items():
            tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "1.00"
            lines.append(f"| {n} | {r['tokens_per_second']:.1f} | ±{r['spread']:.0%} | {ratio(r, 'vs_full')} | "
                         f"{tps} | {r['same_tokens_as_full']} | {r['layer_positions_per_token']:.1f} |"
                         + (f" {ratio(r, 'vs_versus_full')} |" if sp.get("versus") else ""))
        if sp.get("versus"):
            vc = res["settings"].get("versus_draft_cost")
            lines += ["", f"versus: `{sp['versus']}`" + (f", draft cost {vc}" if vc is not None else "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--data", type=Path, nargs="+", help="text folders (default: ../shared/data)")
    p.add_argument("--per-domain", type=int, default=8, help="held-out prompts per domain for acceptance")
    p.add_argument("--timed-per-domain", type=int, default=2, help="of those, prompts per domain in the timed part")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15, help="timed paired rounds (0: acceptance only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draft-tokens", type=int, default=6)
    p.add_argument("--draft-cost", type=float, help="a drafted position's cost for the draft-length rule "
                   "(default: the runtime's)")
    p.add_argument("--versus-draft-cost", type=float, help="--draft-cost for the --versus rows")
    p.add_argument("--versus", type=Path, help="another export (e.g. the same checkpoint in another KV layout): "
                   "its full path and exact decoding join the timed rounds")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for folder in [a.export] + ([a.versus] if a.versus else []):
        if not (folder / "manifest.json").is_file():
            p.error(f"{folder} is not an export folder (no manifest.json)")
    if a.rounds and a.rounds < 3:
        p.error("--rounds must be 0 or at least 3 (for an interval)")
    from exporter.data import default_data_dir
    from runtime import Runtime

    rt = Runtime.load(a.export, threads=a.threads)
    drafting = {"draft_tokens": a.draft_tokens, **({"draft_cost": a.draft_cost} if a.draft_cost is not None else {})}
    prompts = heldout_prompts(a.export, a.data or [default_data_dir()], a.per_domain, a.prompt_tokens)
    res = {"command": command_line("benchmarks.multitoken", argv),
           "settings": {"export": str(a.export), "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                        "draft_tokens": a.draft_tokens, "draft_cost": a.draft_cost, "versus_draft_cost": a.versus_draft_cost,
                        "threads": a.threads, "precision": rt.manifest.precision},
           "acceptance": acceptance(rt, prompts, a.new_tokens, drafting)}
    if a.rounds:
        first = next(iter(prompts.values()))[0]
        res["call_cost"] = call_cost(rt, first)
        timed = [q for ps in prompts.values() for q in ps[:a.timed_per_domain]]
        versus = Runtime.load(a.versus, threads=a.threads) if a.versus else None
        res["speed"] = speed(rt, timed, a.new_tokens, a.rounds, drafting, versus,
                             {**drafting, "draft_cost": a.versus_draft_cost} if a.versus_draft_cost is not None else None)
    md = markdown(res)
    write_report(a.out, "multitoken", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
