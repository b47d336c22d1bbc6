#!/usr/bin/env bash
# Create benchmarks/.venv-optimum: the optimum/onnxruntime baseline (row b of benchmarks/run.py).
#
# optimum's ONNX exporter (optimum-onnx 0.1.0) needs transformers<4.58, while the project pins
# transformers 5.24, so the baseline lives in its own environment (see ../shared/KNOWN.md).
# benchmarks/run.py drives it through benchmarks/optimum_worker.py with this venv's python.
#
#   bash benchmarks/setup_optimum.sh            # create or update
#   PYTHON=python3.11 bash benchmarks/setup_optimum.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh" .venv-optimum   # $venv made, pip upgraded
install_cpu_torch
"$venv/bin/python" -m pip install -q \
    "transformers==4.57.6" "optimum==2.1.0" "optimum-onnx[onnxruntime]==0.1.0" \
    "tokenizers==0.22.2" "huggingface_hub==0.36.2" "onnxruntime==1.32.0" \
    "gguf==0.19.0" "accelerate==1.15.0" "sentencepiece>=0.2" "psutil>=5.9"
# (gguf + accelerate: transformers 4.57 needs both to load SmolLM2's GGUF before optimum-cli exports it)
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for p in ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "tokenizers", "huggingface_hub",
          "accelerate", "gguf"):
    print(f"{p}=={md.version(p)}")
from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401  (fails here if the set is broken)
print("optimum venv ready")
EOF
