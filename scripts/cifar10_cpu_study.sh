#!/usr/bin/env bash
# The CIFAR-10 study on the cifar10_cpu recipe, resumable: run it again after an interruption and
# it continues where it stopped (finished runs are reused). 24 runs, two at a time on 2 CPU cores:
# about 3.3 hours on an Intel Xeon with AVX-512 (~17 min per run, ~420 images/s), of which Table 4
# (15 runs) takes 2.2; about 7 hours on an AMD EPYC with AVX2 only (34 min per ASL run, 42 per DW3;
# the later 1B-DW3-1 runs 36-40). All measured before asl train kept freed memory by default.
# With channels_last by default and the OpenMP build, the EPYC ran one ASL and one 1B-DW3-B-1 run
# at once in 14.3 minutes: about 2.9 hours for the 24 runs (extrapolated from that one pair).
# With the fused BatchNorm-ReLU and the scratch-plane shift kernels the same pair took 13.2 minutes;
# the study itself, rerun at commit 52159ea on that EPYC, took 1 h 45 min for Table 4 (docs/results.md,
# "Reproduce"). Its runs took 12-15 minutes each, two at a time; when a step ended on an odd run
# one core sat idle, so the training now runs in two lanes (below): about 2.7 hours, estimated.
#   bash scripts/cifar10_cpu_study.sh CIFAR10_DIR [JOBS] [KEY=VALUE...]   (overrides go to every run)
# 1. Table 4: GS, SI, SR, TR and TN (TR learned from SR's N(0,1) start), 3 seeds each.
# 2. TR with the authors' shift rate (0.01 x lr, no square-root rule) beside TR with the rule.
# 3. Table 2: the ASL block against 1B-DW3-B-1 and 1B-DW3-1, 3 seeds (the ASL cell is TR's runs).
# 4. Fig. 3 and the shift travel of TR seed 0 against the authors'-rate run of seed 0.
# With JOBS = 2 the runs of steps 1-3 train first, in two lanes; each step's CSV follows.
# STEPS="rate table2" (any of ablate, rate, table2, figures) runs only those steps, e.g. on a machine
# that has the earlier steps' CSVs but not their run folders; a cell whose runs are missing trains.
set -euo pipefail
DIR=${1:?usage: scripts/cifar10_cpu_study.sh CIFAR10_DIR [JOBS] [KEY=VALUE...]}
J=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
OV=("$@")
R=runs/cifar10_cpu
SEEDS=3
KEYS=(--seed-key train.seed --seed-key model.args.shift_seed)
STEPS=" ${STEPS:-ablate rate table2 figures} "
step() { [[ $STEPS == *" $1 "* ]]; }
# the shift learning rate the square-root rule gives this schedule (asl_cli.train.optim.shift_lr_mult)
RULE=$(python -c "import sys; from asl_cli.config import load_config; from asl_cli.train.optim import shift_lr_mult
print(round(shift_lr_mult(load_config('cifar10_cpu', sys.argv[1:])), 6))" "${OV[@]}")

reuse_tr() {  # TR's finished runs serve as another grid's cell of the same configuration
  local cell=$1 root=$2
  for ((s = 0; s < SEEDS; s++)); do
    if [ -f "$R/ablate/TR-seed$s/checkpoints/last.pt" ] && [ ! -e "$root/$cell-seed$s" ]; then
      mkdir -p "$root" && cp -r "$R/ablate/TR-seed$s" "$root/$cell-seed$s"
    fi
  done
}

# Each step's grid: ablate VARIANTS JOBS CSV, rate RATES JOBS CSV [ARGS], table2 BLOCKS JOBS CSV.
ablate() {
  asl ablate cifar10_cpu data.path="$DIR" "${OV[@]}" --variant "$1" --seeds $SEEDS --jobs "$2" --root $R/ablate --csv "$3" --overwrite
}
rate() {
  asl sweep cifar10_cpu data.path="$DIR" "${OV[@]}" model.args.shift_mode=TR optim.shift_lr_reference_iterations=null \
    --axis "optim.shift_lr_mult=$1" --seeds $SEEDS --jobs "$2" "${KEYS[@]}" --root $R/rate --csv "$3" --overwrite "${@:4}"
}
table2() {
  asl sweep cifar10_cpu data.path="$DIR" "${OV[@]}" --axis "model.args.spatial=$1" --seeds $SEEDS --jobs "$2" "${KEYS[@]}" \
    --root $R/table2 --csv "$3" --overwrite
}

# Training, with JOBS = 2, in two lanes of one run at a time, each with half the cores as threads
# (the cells do not depend on one another, so neither lane waits for a step's last run): lane A
# trains GS, SI, SR and TR (12 runs), lane B TN, the authors'-rate TR and the two depthwise cells
# (12 runs). Then every step's summary pass below reuses the finished runs and writes its CSV and
# figure; with another JOBS those passes train, JOBS runs at a time.
LANES=$R/lanes
lane_a() {
  if step ablate; then ablate GS,SI,SR,TR 1 $LANES/ablate_a.csv; fi
}
lane_b() {
  if step ablate; then ablate TN 1 $LANES/ablate_b.csv; fi
  if step rate; then rate 0.01 1 $LANES/rate_b.csv; fi
  if step table2; then table2 dw3_bn,dw3 1 $LANES/table2_b.csv; fi
}
if (( J == 2 )) && [[ $STEPS == *" ablate "* || $STEPS == *" rate "* || $STEPS == *" table2 "* ]]; then
  mkdir -p $LANES
  echo "lane B (TN, the authors' rate, the depthwise cells) runs beside this one; its progress: $LANES/b.log"
  T=${OMP_NUM_THREADS:-$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))}  # a one-job asl trains in-process, on all cores unless told
  OMP_NUM_THREADS=$T lane_b > $LANES/b.log 2>&1 &
  B=$!
  trap 'pkill -P $B 2> /dev/null; kill $B 2> /dev/null' EXIT  # lane B's training stops with this script
  OMP_NUM_THREADS=$T lane_a
  wait $B || { echo "lane B failed: see $LANES/b.log" >&2; exit 1; }
  trap - EXIT
fi

if step ablate; then
  ablate GS,SI,SR,TR,TN "$J" results/ablate_cifar10_cpu.csv
fi
if step rate; then
  reuse_tr "$RULE" $R/rate
  rate "$RULE,0.01" "$J" results/tr_rate_cifar10_cpu.csv --baseline "$RULE" \
    --title "TR: the square-root rule's shift rate vs the authors' (cifar10_cpu)"
fi
if step table2; then
  reuse_tr asl $R/table2
  table2 asl,dw3_bn,dw3 "$J" results/table2_cifar10_cpu.csv
fi
if step figures; then
  TR0=$R/ablate/TR-seed0
  [ -d "$TR0" ] || TR0=$R/rate/$RULE-seed0  # the same configuration, trained by the rate step
  asl plot-shifts "$TR0" --out results/shifts/cifar10_cpu-TR-seed0 --overwrite
  asl plot-shifts "$TR0" "$R/rate/0.01-seed0" --out results/shift_travel_cifar10_cpu --overwrite
fi
