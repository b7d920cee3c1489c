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
  # No --compile-bytecode: compiling all of site-packages (335 MB of Python, mostly never imported) took 34 of
  # this script's 43 s on 2 cores. Python writes the bytecode of what is imported on first import; where the
  # machine forbids that (PYTHONDONTWRITEBYTECODE), every process compiles its imports again (a micro federation
  # 40 -> 70 CPU s), so the test suite allows it for itself and its processes (tests/conftest.py). To compile
  # everything up front instead: UV_COMPILE_BYTECODE=1 ./scripts/setup.sh (uv reads it).
  install() {
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" "${UV_ARGS[@]}" "$@" || {
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
