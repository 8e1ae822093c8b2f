#!/usr/bin/env bash
# One call on a GPU machine: build the extension (CPU + CUDA), run the CUDA tests (agreement with
# the reference and the CPU kernels, gradcheck, opcheck, torch.compile) and the CUDA benchmark.
# Logs and the benchmark CSV go to $OUT (default ./gpu_out). Uses the torch already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== build" | tee "$OUT/log.txt"
start=$(date +%s)
FORCE_CUDA=1 python -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
python -c "import asl_cli; print(asl_cli.backends())" 2>&1 | tee -a "$OUT/log.txt"
echo "== CUDA tests" | tee -a "$OUT/log.txt"
python -m pytest -q -x tests/test_ops.py tests/test_nn.py -k "cuda or gradcheck or opcheck" 2>&1 | tail -25 | tee -a "$OUT/log.txt"
echo "== benchmark" | tee -a "$OUT/log.txt"
python -m asl_cli profile --op asl --device cuda --min-run-time 0.3 --out "$OUT/profile_op_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
