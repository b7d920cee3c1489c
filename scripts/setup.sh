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

# uv installs the same packages in seconds where pip takes one to two minutes. It does not read pip's
# configuration, so scripts/uv_args.py passes it on (indexes, wheel folders, constraints); where it cannot,
# or uv fails, pip installs as before. FEDSOV_INSTALLER=pip skips uv.
UV_ARGS=()
if [ "${FEDSOV_INSTALLER:-uv}" = uv ] && pip install --quiet "uv>=0.13.5,<0.14" >/dev/null 2>&1 \
  && lines=$("$VENV/bin/python" scripts/uv_args.py "$(pip config list 2>/dev/null)"); then
  while IFS= read -r line; do
    case "$line" in
      "ENV "*) export "${line#ENV }" ;;
      ?*) UV_ARGS+=("$line") ;;
    esac
  done <<< "$lines"
  # --compile-bytecode: pip writes .pyc files at install, uv only when asked. Without them every process pays
  # for compiling what it imports (importing torch and transformers took 11 s instead of 5) wherever Python may
  # not write them itself (PYTHONDONTWRITEBYTECODE, read-only installs).
  install() {
    "$VENV/bin/uv" pip install --compile-bytecode --python "$VENV/bin/python" "${UV_ARGS[@]}" "$@" || {
      echo "uv could not install $*; installing with pip instead."
      pip install "$@"
    }
  }
else
  install() { pip install "$@"; }
fi

# Install torch before the project so the resolver never reaches for a CUDA build
# (several GB) on a machine without a GPU.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    install "torch==$TORCH_VERSION"
  elif echo "Installing torch $TORCH_VERSION (CPU build) ..." && install "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1; then
    :  # the configured sources (e.g. a find-links wheel folder) had the CPU build; its dependencies
       # come from the usual index. Asking PyTorch's index only when needed avoids minutes of retries
       # where that index is unreachable.
  else
    install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
install -e ".[dev]"
echo "$want" > "$STAMP"
