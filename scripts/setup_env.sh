#!/usr/bin/env bash
# Creates .venv with torch and the project's dependencies, and (re)builds the compiled extension
# when its sources changed. Safe to run repeatedly; used by quickstart.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ASL_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

DEPS_STAMP="$VENV/.asl-deps"
DEPS="torch==2.14.1 torchvision==0.29.1 typer rich pandas pyyaml matplotlib pytest scikit-image submitit onnx onnxruntime onnxscript ninja setuptools wheel"
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$DEPS" ]; then
  echo "[setup] installing dependencies (torch 2.14.1, torchvision 0.29.1, ...)"
  # shellcheck disable=SC2086
  python -m pip install $DEPS > "$VENV/deps.log" 2>&1 || {
    tail -n 40 "$VENV/deps.log"; echo "[setup] dependency install failed; full log in $VENV/deps.log"; exit 1; }
  echo "$DEPS" > "$DEPS_STAMP"
fi

# Rebuild the extension when the C++/CUDA sources, the build script or torch changed.
BUILD_STAMP="$VENV/.asl-build"
HAVE_NVCC=$(command -v nvcc >/dev/null 2>&1 && echo yes || echo no)
KEY=$( (cat setup.py pyproject.toml; find ext -type f | sort | xargs cat; python -c "import torch; print(torch.__version__)"; echo "nvcc=$HAVE_NVCC ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$BUILD_STAMP" 2>/dev/null)" != "$KEY" ] || ! ls asl_cli/_C*.so >/dev/null 2>&1; then
  if [ "$HAVE_NVCC" = yes ] && [ "${ASL_NO_CUDA:-}" != 1 ]; then
    echo "[setup] building the extension: C++ CPU kernels, and the CUDA kernels with nvcc (they run where a GPU is visible)"
  else
    echo "[setup] building the extension: C++ CPU kernels"
  fi
  python -m pip install -v --no-build-isolation --no-deps -e . > "$VENV/build.log" 2>&1 || {
    tail -n 60 "$VENV/build.log"; echo "[setup] build failed; full log in $VENV/build.log"; exit 1; }
  # setup.py runs more than once in a build: each of its lines once
  grep "asl build:" "$VENV/build.log" | sed 's/^ */[setup] /' | awk '!seen[$0]++' || true
  echo "$KEY" > "$BUILD_STAMP"
fi
python -c "
import asl_cli, torch
b = asl_cli.backends()
gpu = 'a GPU is visible' if torch.cuda.is_available() else 'no GPU visible here'
print(f\"[setup] ready: CPU tensors use the {b['cpu']} kernels; CUDA tensors the {b['cuda']} ones ({gpu})\")
if 'extension_error' in b:
    print('[setup] extension error:', b['extension_error'])
"
