#!/usr/bin/env bash
# The README's test command: unit tests on tiny random models, integration tests on ../shared models.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_CACHE="${HF_HUB_CACHE:-$(cd .. && pwd)/shared/hf-cache}" TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
