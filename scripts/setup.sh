#!/usr/bin/env bash
# Creates .venv and installs fedsov with its test extras. Idempotent: a second run
# only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${FEDSOV_TORCH_VERSION:-2.13.0}
VENV=.venv
STAMP="$VENV/.fedsov-installed"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# Install torch before the project so the resolver never reaches for a CUDA build
# (several GB) on a machine without a GPU.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION"
  elif echo "Installing torch $TORCH_VERSION (CPU build) ..." && pip install "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1; then
    :  # pip's configured sources (e.g. a find-links wheel folder) had the CPU build; its dependencies
       # come from the usual index. Asking PyTorch's index only when needed avoids minutes of retries
       # where that index is unreachable.
  else
    pip install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -e ".[dev]"
echo "$want" > "$STAMP"
