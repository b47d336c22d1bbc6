"""Write benchmarks/RESULTS.md: every committed benchmark result, each with the command that made it.

    python scripts/readme_results.py

The figures are never typed by hand: each section below is a file that a command in
`benchmarks/` (or `lama train`) wrote under benchmarks/results/, copied whole, and the command is
quoted with it. README.md links to this page and to the result files; the reading of the figures
(what they say, with their caveats) is docs/findings.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"

SECTIONS = [
    ("Training and calibration on a real model (stories260K, from `../shared/hf-cache`)",
     "stories260k/train.txt",
     "`lama train stories260k --out runs/stories260k` (the recipe `models/stories260k.json`; 5 layers, "
     "exits after layers 1-4). The tables are per exit at target 0.95: on the calibration tokens the "
     "thresholds were fitted on, and on held-out text that neither training nor calibration saw. "
     "Compute saved counts decoder layers only (not the checks)."),
    ("Side by side: PyTorch, optimum/onnxruntime, our chain, calibrated and budgeted exits, oracle",
     "stories260k/results.md", None),
    ("Threshold calibration vs. the EERO budget vs. the oracle (stories260K)",
     "stories260k/budget-gate/budget_curve.md",
     "`python benchmarks/budget_curve.py runs/bench/stories260k/ckpt --scores gate --targets 0.6 0.7 0.8 0.9 "
     "0.95 0.99 --out benchmarks/results/stories260k/budget-gate`; the same with the heads' top-1 "
     "confidence (each check costs a head, 0.77 layers here: feasible budgets 0.2190-1, budget 1 = 1.615x the "
     "plain model) is in `budget-head/` (below).\n\n"
     "![budget curve](results/stories260k/budget-gate/budget_curve.png)"),
    ("Threshold calibration vs. the EERO budget, head checks (stories260K)",
     "stories260k/budget-head/budget_curve.md",
     "`python benchmarks/budget_curve.py runs/bench/stories260k/ckpt --scores head --targets 0.6 0.7 0.8 0.9 "
     "0.95 0.99 --out benchmarks/results/stories260k/budget-head`.\n\n"
     "![budget curve, head checks](results/stories260k/budget-head/budget_curve.png)"),
    ("Exit gates vs. a full head at every exit (SmolLM2-135M)",
     "smollm2-135m/exit_cost.md", "![agreement vs compute](results/smollm2-135m/exit_cost.png)"),
    ("Side by side on SmolLM2-135M (gate mode): fp32, int8, int4, KV policies, llama.cpp, optimum",
     "smollm2-135m/results.md", None),
    ("Work per KV policy on SmolLM2-135M (the earlier run, all 8 exits)", "smollm2-135m/kv_policies.md", None),
    ("How faithful each 4-bit model is: llama.cpp's Q4_1 run and our int4 exports (SmolLM2-135M)",
     "smollm2-135m/llamacpp_fidelity/llamacpp_fidelity.md",
     "`python benchmarks/llamacpp_fidelity.py runs/smollm2-135m/ckpt-pruned runs/bench/smollm2-pruned/onnx-int4 "
     "runs/bench/smollm2-pruned/onnx-int4-requant --out benchmarks/results/smollm2-135m/llamacpp_fidelity`."),
    ("Where the int4 chain's time goes (SmolLM2-135M)", "smollm2-135m/profile-int4/profile.md",
     "`python benchmarks/profile_chain.py runs/bench/smollm2-main/onnx-int4 --threads 2 --out "
     "benchmarks/results/smollm2-135m/profile-int4` (profiled: onnxruntime's profiler adds a few "
     "microseconds per node, so slower than the benchmark's row). 'MatMul' and most of 'Add' are the float "
     "block-offset products that keep the GGUF's Q4_1 blocks exact."),
    ("Thread pools for a chain of sessions (SmolLM2-135M)", "smollm2-135m/thread_pools/thread_pools.md",
     "`python benchmarks/thread_pools.py runs/bench/smollm2-pruned/onnx-int4 runs/bench/smollm2-pruned/onnx-int4-requant "
     "runs/bench/smollm2/onnx-int4 --threads 2 --repeats 9 --out benchmarks/results/smollm2-135m/thread_pools` "
     "(`smollm2/onnx-int4` is the earlier export: all 8 exits, 9 segments, no fused products, re-quantized)."),
    ("Does the promise hold on text calibration never saw? (SmolLM2-135M, per domain)",
     "smollm2-135m/domains-main/domains.md",
     "`python benchmarks/domains.py runs/smollm2-135m/ckpt --target 0.95 --margin 0.03 --out "
     "benchmarks/results/smollm2-135m/domains-main`, on the checkpoint `bash scripts/main.sh` made from a "
     "fresh clone (exits 15, 21, 24 kept by the recipe's exit_min_share). The margin 0.03 was chosen on the "
     "8-exit checkpoint before pruning: without it (`domains/`) the exiting tokens agreed 0.939 "
     "[0.927, 0.950] on held-out text and 33 of 49 cells fell short; with it (`domains-margin0.03/`) none."),
    ("Learning curve (SmolLM2-135M)", "smollm2-135m/learning_curve/README.md", None),
    ("Gate features (SmolLM2-135M)", "smollm2-135m/gate_features/gate_features.md", None),
    ("The same export with and without its exits, side by side (SmolLM2-135M)", "smollm2-135m/exits-ab/compare.md",
     "`python benchmarks/compare_exports.py` on the main job's export, thresholds never vs 0.95, 25 alternating "
     "rounds (the command is in the file)."),
    ("Block sums as Reshape + ReduceSum vs a MatMul by a 0/1 matrix (SmolLM2-135M int4)",
     "smollm2-135m/blocksum-ab/compare.md", None),
    ("The earlier run with the re-quantized int4 export (SmolLM2-135M)", "smollm2-135m/with-requant/results.md",
     None),
    ("KV buffers updated in place vs concat, one graph (SmolLM2-135M shapes)",
     "smollm2-135m/kv_buffer/graph/kv_buffer.md", None),
    ("KV buffers updated in place vs concat, through the exported chain (SmolLM2-135M shapes)",
     "smollm2-135m/kv_buffer/chain/kv_buffer.md", None),
    ("Work per KV policy (stories260K)", "stories260k/kv_policies.md", None),
    ("Cost of one chain pass vs. positions carried (stories260K)", "stories260k/deferral_cost.md", None),
    ("Per domain without the calibration margin (SmolLM2-135M, 8 exits)", "smollm2-135m/domains/domains.md", None),
    ("Per domain with the 0.03 margin (SmolLM2-135M, 8 exits)", "smollm2-135m/domains-margin0.03/domains.md",
     None),
    ("How faithful onnxruntime-genai's int4 build is (SmolLM2-135M)",
     "smollm2-135m/genai_fidelity/llamacpp_fidelity.md",
     "`python benchmarks/llamacpp_fidelity.py smollm2-135m --out benchmarks/results/smollm2-135m/genai_fidelity` "
     "(onnxruntime-genai 0.18's builder defaults: symmetric round-to-nearest, blocks of 32, re-quantizing the "
     "dequantized Q4_1 GGUF; llama.cpp skipped there: its venv was absent)."),
    ("Exact multi-token decoding, int4 (SmolLM2-135M)", "smollm2-135m/multitoken-int4/multitoken.md",
     "Commands and reading: [multitoken-int4/README.md](results/smollm2-135m/multitoken-int4/README.md)."),
    ("Exact multi-token decoding, fp32 (SmolLM2-135M)", "smollm2-135m/multitoken-fp32/multitoken.md", None),
    ("Lookahead heads, offline acceptance (SmolLM2-135M)", "smollm2-135m/lookahead/lookahead.md", None),
    ("Online check in relaxed mode, each domain left out of calibration (SmolLM2-135M)",
     "smollm2-135m/online-check/online_check.md",
     "Reading and the loose-threshold run: [online-check/README.md](results/smollm2-135m/online-check/README.md)."),
    ("The chain with exits off vs one graph of the same weights, gates behind a switch (SmolLM2-135M)",
     "smollm2-135m/gate-switch/vs_llamacpp.md",
     "Reading, the A/B runs and the runtime's call overhead before it: [gate-switch/README.md]"
     "(results/smollm2-135m/gate-switch/README.md), [chain-overhead/README.md](results/smollm2-135m/chain-overhead/README.md)."),
    ("MatMulNBits zero points (why the exact int4 blocks keep a float offset product)",
     "smollm2-135m/matmulnbits-zero-points/zero_points.md", None),
    ("An EAGLE-style drafter against prompt lookup, offline (SmolLM2-135M)", "smollm2-135m/eagle/eagle.md",
     "Reading: [eagle/README.md](results/smollm2-135m/eagle/README.md)."),
    ("Exact multi-token decoding vs llama.cpp, same run (SmolLM2-135M)",
     "smollm2-135m/multitoken-vs-llamacpp/vs_llamacpp.md",
     "The int4 export of multitoken-int4/README.md; llama.cpp (llama-cpp-python 0.3.36, setup_llamacpp.sh) on the "
     "Q4_1 GGUF it was made from, plain and with LlamaPromptLookupDecoding(num_pred_tokens=6)."),
    ("KV buffers recycled between generations (SmolLM2-135M)", "smollm2-135m/kv_recycle/kv_recycle.md", None),
    ("Fused onnxruntime ops in the int4 graphs, side by side (SmolLM2-135M)", "smollm2-135m/fused-ops-ab/compare.md",
     "SkipSimplifiedLayerNormalization, q|k|v packed into GroupQueryAttention, AveragePool block sums (B) against "
     "the export before them (A). Commands: [full-path-vs-genai/README.md](results/smollm2-135m/full-path-vs-genai/README.md)."),
    ("The full path against onnxruntime-genai and llama.cpp, two thread pools, same run (SmolLM2-135M int4)",
     "smollm2-135m/full-path-vs-genai/vs_llamacpp.md",
     "Commands and reading: [full-path-vs-genai/README.md](results/smollm2-135m/full-path-vs-genai/README.md)."),
    ("Re-quantized int4 blocks against onnxruntime-genai, same run (SmolLM2-135M)",
     "smollm2-135m/requant-vs-genai/vs_llamacpp.md",
     "`lama export ... --no-exact-blocks`: the blocks re-quantized as onnxruntime-genai's builder does "
     "(teacher-forced agreement with fp32 0.625 against 0.957 for the exact export, on the checkpoint's held-out windows)."),
    ("The full path against onnxruntime-genai, after the gate switch: exact blocks (SmolLM2-135M int4, 2026-12-05)",
     "smollm2-135m/exact-int4-vs-genai/vs_llamacpp.md",
     "Commands, fidelity on the same tokens and reading: [fast-int4-vs-genai/README.md](results/smollm2-135m/fast-int4-vs-genai/README.md)."),
    ("The same, re-quantized asymmetric blocks (`--no-exact-blocks --no-symmetric`, SmolLM2-135M int4, 2026-12-05)",
     "smollm2-135m/fast-int4-vs-genai/vs_llamacpp.md",
     "Commands, fidelity on the same tokens and reading: [fast-int4-vs-genai/README.md](results/smollm2-135m/fast-int4-vs-genai/README.md)."),
    ("Fidelity of each int4 model on the same 4,096 held-out tokens (SmolLM2-135M)",
     "smollm2-135m/requant-fidelity/llamacpp_fidelity.md", None),
    ("The model's own n-gram table as a draft source, offline (SmolLM2-135M)",
     "smollm2-135m/ngram-drafter/ngram_drafter.md", None),
    ("Exact decoding with lookup and the n-gram table, same run (SmolLM2-135M int4)",
     "smollm2-135m/multitoken-ngram/multitoken.md",
     "How the export got its table, and the reading: [multitoken-ngram/README.md](results/smollm2-135m/multitoken-ngram/README.md)."),
    ("Gemma 3 270M int4: the side-by-side rows", "gemma3-270m/int4/results.md",
     "Reading: [gemma3-270m/README.md](results/gemma3-270m/README.md)."),
    ("Exact multi-token decoding on Gemma 3 270M int4 (prompt lookup)", "gemma3-270m/multitoken-int4/multitoken.md",
     "Reading: [gemma3-270m/README.md](results/gemma3-270m/README.md)."),
    ("Exact multi-token decoding on Gemma 3 270M, fp32 export (prompt lookup)", "gemma3-270m/multitoken/multitoken.md",
     "Reading: [gemma3-270m/README.md](results/gemma3-270m/README.md)."),
    ("Is a position computed the same in a multi-position call? (why int4 exact decoding is not bit-exact)",
     "smollm2-135m/shape-invariance/shape_invariance.md", None),
    ("One decode step op by op: our graphs and onnxruntime-genai's (SmolLM2-135M int4)",
     "smollm2-135m/graph-profile/graph_profile.md", None),
    ("One decode step op by op: the chain's segment graphs and the plain graph (SmolLM2-135M int4)",
     "smollm2-135m/graph-profile-chain/graph_profile.md",
     "One 64-step timing per graph: the same plain graph took 5.28 ms in the run above and 6.03 ms here."),
    ("Q4_1 without the float offset product: integer zero points (SmolLM2-135M)",
     "smollm2-135m/q4_1-zero-points/q4_1_zero_points.md", None),
    ("Gemma 3 270M end to end: the main job's model against llama.cpp and PyTorch (short run)",
     "gemma3-270m/results.md",
     "Commands and reading: [gemma3-270m/README.md](results/gemma3-270m/README.md) (the main job's log and load "
     "readings are in `main-job/`)."),
    ("How faithful the Gemma 3 270M exports are: llama.cpp's run of the same GGUF and our int8 export",
     "gemma3-270m/llamacpp_fidelity/llamacpp_fidelity.md", None),
]


HEADER = """# Benchmark results

Generated by `python scripts/readme_results.py` from the files under `benchmarks/results/`: never
edit this page by hand. Every figure below comes from a command in this repository, quoted with
it, on the machine named in it (a shared 2-core AMD EPYC VM without GPU unless it says otherwise;
no GPU was available to this project's sessions so far: the TensorRT and CUDA paths are tested with
fakes on CPU and by the GPU tests that skip there). What the figures say, with their caveats, is
[docs/findings.md](../docs/findings.md); how to run the benchmarks is [README.md](README.md).
"""


def demote(text: str) -> str:
    """Headings of an included file go below this page's section level."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text, flags=re.M)


def block() -> str:
    parts = []
    for title, rel, intro in SECTIONS:
        path = RESULTS / rel
        if not path.is_file():
            print(f"skipped {rel}: not found", file=sys.stderr)
            continue
        body = path.read_text().strip()
        if rel.endswith(".txt"):
            body = "```\n" + body + "\n```"
        else:
            body = demote(body)
        parts.append(f"## {title}\n\n" + (intro + "\n\n" if intro else "")
                     + f"(from [`benchmarks/results/{rel}`](results/{rel}))\n\n" + body)
    return "\n\n".join(parts)


def main() -> int:
    OUT.write_text(HEADER + "\n" + block() + "\n")
    print(f"{OUT.relative_to(ROOT)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
