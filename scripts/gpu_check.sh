#!/usr/bin/env bash
# One call on a GPU machine (about 5 minutes, build included): build the extension (CPU + CUDA),
# run every CUDA test (agreement with the reference and the CPU kernels, the fast-path kernels,
# gradcheck, opcheck, torch.compile, CUDA-graph training steps, mixed precision), then the GPU
# benchmarks: the operator against copy/ReLU/cuDNN depthwise, training throughput of the
# step that `asl train` runs (eager vs CUDA graph, fp32 NCHW and bf16 channels_last, with the
# GPU's busy fraction), a timed `asl train` run with evaluations, and model latency.
# Uses the torch already installed there. Everything is written flat to $OUT (default ./gpu_out):
# log.txt, tests.txt, build.log and the CSVs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$OUT/log.txt"; }
nvidia-smi 2>&1 | head -15 >> "$OUT/log.txt" || true
log "== build"
start=$(date +%s)
FORCE_CUDA=1 python -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s"
python -c "import asl_cli, torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); print(asl_cli.backends())" 2>&1 | tee -a "$OUT/log.txt"

log "== a wrong-shape grad_output raises on CPU and CUDA (no crash); where it crashes, a native backtrace"
DIAG=$(mktemp --suffix=.py)
cat > "$DIAG" <<'EOF'
import sys, torch, asl_cli
dev = sys.argv[1]
x, s, g = torch.randn(8, 16, 17, 19), torch.rand(16, 2), torch.randn(8, 16, 9, 10)
try:
    torch.ops.asl.active_shift_grad_shift(g.to(dev), x.to(dev), s.to(dev), [2, 2], [1, 1])
    print(dev, "DID NOT RAISE")
except ValueError as e:
    print(dev, "raised ValueError:", str(e).splitlines()[0])
EOF
for dev in cpu cuda; do
  python -X faulthandler "$DIAG" $dev 2>&1 | head -4 | tee -a "$OUT/log.txt"
done
log "-- a wrong input to the forward:"
python -c "import torch, asl_cli; torch.ops.asl.active_shift(torch.randn(3, 5, 5), torch.zeros(3, 2), [1, 1], [0, 0])" 2>&1 | tail -2 | tee -a "$OUT/log.txt"
if command -v gdb >/dev/null; then
  gdb -q -batch -ex run -ex bt --args python "$DIAG" cpu 2>&1 | grep -A40 "SIGSEGV" | head -45 | tee -a "$OUT/log.txt"
else
  log "(no gdb on this machine)"
fi

log "== CUDA tests"
python -m pytest -q -p no:cacheprovider tests -m cuda 2>&1 | tail -30 > "$OUT/tests.txt"
tail -5 "$OUT/tests.txt" | tee -a "$OUT/log.txt"
python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "gradcheck or opcheck" 2>&1 | tail -3 | tee -a "$OUT/log.txt"

log "== operator benchmark"
python -m asl_cli profile op --device cuda --min-run-time 0.2 --out "$OUT/profile_op_cuda.csv" 2>&1 | tail -40 | tee -a "$OUT/log.txt"

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then log "(GPU_CHECK_QUICK=1: training and model benchmarks skipped)"; exit 0; fi

log "== training throughput (the step asl train runs)"
python -m asl_cli profile train-speed asnet20_16x1 --device cuda --batch 128 --mode eager --mode graph \
  --min-run-time 1 --out "$OUT/train_speed_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
python -m asl_cli profile train-speed asnet20_16x1 --device cuda --batch 128 --mode graph --amp bf16 --layout channels_last \
  --min-run-time 1 --out "$OUT/train_speed_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
python -m asl_cli profile train-speed asnet20_16x1 --device cuda --batch 128 --mode graph --amp bf16 \
  --min-run-time 1 --out "$OUT/train_speed_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then  # torch.compile of three networks takes minutes: on request
  python -m asl_cli profile train-speed asnet20_16x1 --device cuda --batch 128 --mode compile --mode compile+graph \
    --min-run-time 1 --out "$OUT/train_speed_cuda.csv" 2>&1 | tee -a "$OUT/log.txt"
fi

log "== asl train, 3000 steps with 3 evaluations of 10,000 images (synthetic data, CUDA graph)"
WORK=$(mktemp -d)
start=$(date +%s.%N)
python -m asl_cli train asnet20_16x1 data.dataset=synthetic data.train_size=50000 data.test_size=10000 \
  train.iterations=3000 train.eval_every=1000 train.ckpt_every=1000 train.log_every=100 "output.dir=$WORK/run" 2>&1 | tail -8 | tee -a "$OUT/log.txt"
log "asl train wall time: $(python -c "print(round($(date +%s.%N) - $start, 1))") s (includes start-up and making the data)"
cp "$WORK/run/metrics.csv" "$OUT/train_metrics.csv" 2>/dev/null || true

log "== model latency"
python -m asl_cli profile models as_resnet_w68 mobilenet_v2_x1.0 as_resnet_w32 mobilenet_v2_x0.5 --device cuda --min-run-time 0.2 \
  --form eager --form inference --out "$WORK/profile_models_cuda.csv" 2>&1 | tail -24 | tee -a "$OUT/log.txt"
cp "$WORK/profile_models_cuda.csv" "$OUT/" 2>/dev/null || true
