# Sourced (not run) by setup_optimum.sh, setup_llamacpp.sh and setup_genai.sh: what every engine's
# venv shares. `. setup_venv.sh .venv-NAME` sets
#   here    benchmarks/ (absolute)        root    the repository root
#   venv    $VENV, else benchmarks/.venv-NAME
#   python  $PYTHON, else python3 (the interpreter the venv is made from)
# creates the venv when it has no python yet and upgrades its pip. `install_cpu_torch` then installs
# torch first, before the packages that need it (optimum, onnxruntime-genai's builder).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="${VENV:-$here/$1}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip

install_cpu_torch() {
    # torch first: where pip's find-links hold the CPU wheel (torch 2.13.0+cpu, as here) pip takes it;
    # elsewhere PyPI's default (CUDA) build of the same version comes, which is much larger.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
}
