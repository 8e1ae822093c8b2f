#!/bin/bash
# The paper's CIFAR-10 studies on a GPU machine, with the recipe's full compressed schedule
# (recipes/cifar10_short.yaml: 8000 iterations of batch 128): Table 4 (GS/SI/SR/TR, 3 seeds) and
# Table 2 (ASL vs 1B-DW3-B-1 vs 1B-DW3-1, 2 seeds), several runs sharing the GPU.
#
#   bash scripts/gpu_studies.sh DATA_DIR [JOBS]
#
# DATA_DIR holds train/<class>/*.{png,jpg} and test/<class>/...; to fit a small upload, carry a
# JPEG re-encoding made with scripts/encode_folder.py (its encoding is recorded in every row).
# CSVs, figures and the shift plots of one TR run go to $OUT (default results/gpu_studies).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/gpu_studies.sh DATA_DIR [JOBS]}
JOBS=${2:-4}
OUT=${OUT:-results/gpu_studies}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/asl-gpu-studies}
python -m asl_cli ablate cifar10_short "data.path=$DATA" --seeds 3 --jobs "$JOBS" --root "$WORK/ablate" \
  --csv "$OUT/ablate_cifar10_short.csv" 2>&1 | tail -20
python -m asl_cli sweep cifar10_short "data.path=$DATA" --axis model.args.spatial=asl,dw3_bn,dw3 --seeds 2 --jobs "$JOBS" \
  --seed-key train.seed --seed-key model.args.shift_seed --root "$WORK/table2" --csv "$OUT/table2_cifar10_short.csv" 2>&1 | tail -12
python -m asl_cli plot-shifts "$WORK/ablate/TR-seed0" --out "$OUT/shifts-TR-seed0" 2>&1 | tail -3
