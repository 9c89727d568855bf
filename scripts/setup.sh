#!/usr/bin/env bash
# Set up a virtual environment for medidiff on a fresh machine.
# Installs the CPU build of torch 2.13.0 when no NVIDIA GPU is present; an existing torch
# (for example a CUDA build a GPU user installed) is left alone.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-dev}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found; installing torch from PyPI (CUDA build)"
  "$PY" -m pip install --quiet "torch>=2.3"
else
  echo "setup: no NVIDIA GPU; installing the CPU build of torch 2.13.0"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[${EXTRAS}]"
echo "setup: done ($VENV)"
