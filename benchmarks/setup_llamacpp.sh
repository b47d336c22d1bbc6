#!/usr/bin/env bash
# Create benchmarks/.venv-llamacpp: the llama.cpp baseline (what CPU and Jetson users run).
#
# llama-cpp-python has no CPU wheel on PyPI for this platform: pip builds llama.cpp from source
# with cmake + gcc (about 6.5 min on 2 busy cores; pip caches the built wheel for later venvs).
# benchmarks/run.py drives it through benchmarks/llamacpp_worker.py with this venv's python, on
# the same SmolLM2-135M-Instruct Q4_1 GGUF file that the exporter fetches from PyPI.
#
#   bash benchmarks/setup_llamacpp.sh            # create or update
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh" .venv-llamacpp   # $venv made, pip upgraded
# native CPU build (AVX2/AVX-512 as the host has): the same flags a user's `pip install` gets
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/python" -m pip install -q "llama-cpp-python==0.3.36" "numpy>=1.26,<3" "psutil>=5.9"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import llama_cpp  # noqa: F401  (fails here if the build is broken)
print(f"llama-cpp-python=={md.version('llama-cpp-python')}")
print("llama.cpp venv ready")
PY
