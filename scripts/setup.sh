#!/usr/bin/env bash
# Set up a virtual environment for medidiff on a fresh machine.
# Installs the CPU build of torch 2.13.0 when no NVIDIA GPU is present; an existing torch
# (for example a CUDA build a GPU user installed) is left alone.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-dev,openvino}"  # openvino: the fastest CPU inference backend (optional)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# pip, quiet: what it prints is only what needs reading. This machine's pip config may name
# index locations that do not exist; pip warns about each on every call, so those lines (and
# only those) are dropped. Errors and other warnings still show, and a failing pip stops the
# set-up with its exit status.
IGNORED_LOCATION="^WARNING: Location '[^']*' is ignored"
pip_install() {
  local status=0
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "$IGNORED_LOCATION" || true; } >&2 || status=$?
  if [ "$status" -ne 0 ]; then
    echo "setup: FAILED: pip install $* (exit status $status); see the pip output above" >&2
    exit "$status"
  fi
}

pip_install --upgrade pip
if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found; installing torch from PyPI (CUDA build)"
  pip_install "torch>=2.3"
else
  echo "setup: no NVIDIA GPU; installing the CPU build of torch 2.13.0"
  pip_install "torch==2.13.0"
fi
echo "setup: installing medidiff and its dependencies (.[${EXTRAS}])"
# setuptools' editable build tells every install, as a warning, to mind same-named folders
PYTHONWARNINGS="ignore:Editable installation" pip_install -e ".[${EXTRAS}]"
echo "setup: done ($VENV)"
