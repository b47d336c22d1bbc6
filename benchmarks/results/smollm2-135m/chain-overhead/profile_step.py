"""Where one decode step's time goes: inside onnxruntime's run_with_iobinding (the graphs) vs
the runtime's Python around it, for the chain and for the plain graph, exits off.

    python benchmarks/results/smollm2-135m/chain-overhead/profile_step.py \
        runs/smol/onnx-int4-fused3 runs/smol/onnx-int4-plain [--tokens 32] [--prompts 4] [--cprofile N]

Both exports are opened in one process with the shared thread pool (2 threads), thresholds
"never", greedy, as the "LAMA full path [shared pool]" and "LAMA plain graph [shared pool]" rows
of benchmarks/multitoken_vs_llamacpp.py. Prompts: 128 held-out tokens, as there. Every decode
step (not the prefill) is timed by the runtime itself (TokenRecord.seconds); onnxruntime's
`run_with_iobinding` (or `run`) is wrapped with a perf_counter pair, so "graphs" is the time
inside it and "Python" the rest of the step. The two exports take turns, prompt by prompt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path


def wrap(backend, clock: list[float]) -> None:
    s = backend.session
    for name in ("run_with_iobinding", "run"):
        orig = getattr(s, name)

        def timed(*a, _orig=orig, **k):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                clock[0] += time.perf_counter() - t0
                clock[1] += 1
        setattr(s, name, timed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions of a cProfile run")
    a = p.parse_args(argv)
    from exporter.data import default_data_dir, heldout_prompts
    from runtime import Runtime

    prompts = [q for ps in heldout_prompts(a.exports[0], [default_data_dir()], 1, 128).values() for q in ps][:a.prompts]
    rts, clocks = {}, {}
    for e in a.exports:
        rt = Runtime.load(e, threads=2, thread_pool="shared")
        clocks[e] = [0.0, 0]
        for b in rt.backends + rt.head_backends:
            wrap(b, clocks[e])
        rts[e] = rt

    def one(e, ids):
        c0 = list(clocks[e])
        recs, graph_first = [], None
        for r in rts[e].stream(ids, a.tokens, thresholds="never", stop_at_eos=False):
            if graph_first is None:  # the prefill step: not counted
                graph_first = list(clocks[e])
            recs.append(r)
        step = sum(r.seconds for r in recs[1:])
        graph = clocks[e][0] - graph_first[0]
        calls = clocks[e][1] - graph_first[1]
        return step, graph, calls, len(recs) - 1, [r.token for r in recs]

    for ids in prompts[:1]:  # warm-up
        for e in a.exports:
            one(e, ids)
    res = {e: [] for e in a.exports}
    for _ in range(a.rounds):
        for ids in prompts:
            for e in a.exports:
                res[e].append(one(e, ids))
    print(f"{len(prompts)} prompts x {a.tokens} tokens x {a.rounds} rounds; decode steps only; ms per token "
          f"(median over generations)")
    print("| export | step | graphs (inside run_with_iobinding) | Python (rest of step) | graph calls per token |")
    print("|---|---:|---:|---:|---:|")
    for e, rows in res.items():
        step = statistics.median(s / n * 1e3 for s, g, c, n, _ in rows)
        graph = statistics.median(g / n * 1e3 for s, g, c, n, _ in rows)
        py = statistics.median((s - g) / n * 1e3 for s, g, c, n, _ in rows)
        calls = rows[0][2] / rows[0][3]
        print(f"| {e} | {step:.3f} | {graph:.3f} | {py:.3f} | {calls:.0f} |")
    toks = [[t for *_, t in rows] for rows in res.values()]
    print("same tokens in every export:", all(t == toks[0] for t in toks))
    if a.cprofile:
        for e in a.exports:
            pr = cProfile.Profile()
            pr.enable()
            for ids in prompts:
                for _ in rts[e].stream(ids, a.tokens, thresholds="never", stop_at_eos=False):
                    pass
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.cprofile)
            print(f"\n## cProfile {e} ({len(prompts)} generations of {a.tokens} tokens, tottime)\n")
            print("\n".join(s.getvalue().splitlines()[:a.cprofile + 12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
