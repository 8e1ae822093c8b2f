"""scripts/cifar10_cpu_study.sh's order of work, with a stand-in `asl` that records its calls (the
real runs take hours): two lanes train, then every step's summary pass; a failing lane stops it."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cifar10_cpu_study.sh"

FAKE_ASL = """#!/usr/bin/env bash
if [ "$1" = config ]; then
  printf 'optim:\\n  shift_lr_mult: 0.01\\n  shift_lr_reference_iterations: 64000\\ntrain:\\n  iterations: 3000\\n'; exit
fi
echo "omp=${OMP_NUM_THREADS:-unset} $*" >> "$CALLS"
[ -n "${FAIL:-}" ] && [[ "$*" == *"$FAIL"* ]] && exit 3
exit 0
"""


def study(tmp_path, jobs, steps=None, fail=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "asl").write_text(FAKE_ASL)
    (bin_dir / "asl").chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls))
    env.pop("STEPS", None)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("FAIL", None)
    if steps:
        env["STEPS"] = steps
    if fail:
        env["FAIL"] = fail
    p = subprocess.run(["bash", str(SCRIPT), "/data", str(jobs)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return p.returncode, lines


def index(lines, *parts):
    hits = [i for i, line in enumerate(lines) if all(p in line for p in parts)]
    assert len(hits) == 1, (parts, lines)
    return hits[0]


def test_two_jobs_train_in_two_lanes_before_the_summaries(tmp_path):
    rc, calls = study(tmp_path, 2)
    assert rc == 0, calls
    lane_a = index(calls, "--variant GS,SI,SR,TR ", "--jobs 1", "lanes/ablate_a.csv")
    lane_b = [index(calls, "--variant TN ", "--jobs 1"), index(calls, "optim.shift_lr_mult=0.01 ", "--jobs 1"),
              index(calls, "spatial=dw3_bn,dw3 ", "--jobs 1")]
    assert lane_b == sorted(lane_b)
    summaries = [index(calls, "--variant GS,SI,SR,TR,TN ", "--jobs 2", "--csv results/ablate_cifar10_cpu.csv"),
                 index(calls, "optim.shift_lr_mult=0.046188,0.01", "--csv results/tr_rate_cifar10_cpu.csv"),
                 index(calls, "spatial=asl,dw3_bn,dw3", "--csv results/table2_cifar10_cpu.csv")]
    # every run is trained before any summary is written
    assert max([lane_a] + lane_b) < min(summaries) and summaries == sorted(summaries)
    # a lane trains in-process: half the cores each, not all of them twice over
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    half = cores // 2 if cores > 2 else 1
    assert all(calls[i].startswith(f"omp={half} ") for i in [lane_a] + lane_b)
    assert all(calls[i].startswith("omp=unset ") for i in summaries)
    assert sum(" plot-shifts " in c for c in calls) == 2 and " plot-shifts " in calls[-1]


def test_one_job_has_no_lanes(tmp_path):
    rc, calls = study(tmp_path, 1)
    assert rc == 0 and not any("lanes/" in c for c in calls), calls
    assert len(calls) == 5  # three summary passes (which train) and two figures


def test_steps_choose_the_lanes_work(tmp_path):
    rc, calls = study(tmp_path, 2, steps="table2")
    assert rc == 0
    assert [c.split(" --seeds")[0].split("--axis ")[1] for c in calls] == [
        "model.args.spatial=dw3_bn,dw3", "model.args.spatial=asl,dw3_bn,dw3"]


@pytest.mark.parametrize("fail", ["--variant TN ", "--variant GS,SI,SR,TR "])
def test_a_failing_lane_stops_the_study(tmp_path, fail):
    rc, calls = study(tmp_path, 2, fail=fail)
    assert rc != 0
    assert not any("results/" in c for c in calls), calls
