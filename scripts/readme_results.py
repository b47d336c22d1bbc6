"""Copy the latest benchmark outputs into README.md (between the results markers).

    python scripts/readme_results.py

The README's figures are never typed by hand: each block below is a file that a command in
`benchmarks/` (or `lama train`) wrote, and the command is quoted with it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

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
     "confidence (each check costs a head, 0.77 layers here) is in `budget-head/`.\n\n"
     "![budget curve](benchmarks/results/stories260k/budget-gate/budget_curve.png)"),
    ("Exit gates vs. a full head at every exit (SmolLM2-135M)",
     "smollm2-135m/exit_cost.md", "![agreement vs compute](benchmarks/results/smollm2-135m/exit_cost.png)"),
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
]


def demote(text: str) -> str:
    """Headings of an included file go below the README's section level."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", text, flags=re.M)


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
        parts.append(f"### {title}\n\n" + (intro + "\n\n" if intro else "") + f"(from `benchmarks/results/{rel}`)\n\n"
                     + body)
    return "\n\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n\n" + block() + "\n\n" + END + tail)
    print("README.md results updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
