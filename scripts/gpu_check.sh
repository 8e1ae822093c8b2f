#!/usr/bin/env bash
# One call on a GPU machine: build the extension (CPU + CUDA), run the CUDA tests (agreement with
# the reference and the CPU kernels, gradcheck, opcheck, torch.compile, a mixed-precision training
# smoke run) and the CUDA benchmarks. Uses the torch already installed there. Everything that
# comes back is written flat to $OUT (default ./gpu_out): log.txt, build.log, nvidia-smi.txt and
# the CSVs profile_op_cuda.csv, train_speed_cuda.csv, profile_models_cuda.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$OUT/log.txt"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
log "== build"
start=$(date +%s)
FORCE_CUDA=1 python -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s"
python -c "import asl_cli, torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); print(asl_cli.backends())" 2>&1 | tee -a "$OUT/log.txt"
log "== CUDA tests"
python -m pytest -q tests/test_ops.py tests/test_nn.py tests/test_train.py -k "cuda or gradcheck or opcheck" 2>&1 | tail -25 | tee -a "$OUT/log.txt"
log "== operator benchmark"
python -m asl_cli profile --op asl --device cuda --min-run-time 0.3 --out "$OUT/profile_op_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
log "== training throughput"
python -m asl_cli profile --train-speed asnet20_16x1 --device cuda --batch 128 --out "$OUT/train_speed_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
log "== model latency"
python -m asl_cli profile --model as_resnet_w68 mobilenet_v2_x1.0 as_resnet_w32 mobilenet_v2_x0.5 --device cuda --min-run-time 0.3 \
  --out "$WORK/profile_models_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
cp "$WORK/profile_models_cuda.csv" "$OUT/" 2>/dev/null || true
