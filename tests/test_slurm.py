"""Sweeps on a real Slurm scheduler: a one-node cluster started on this machine by
scripts/slurm_node.sh (munge, slurmctld, slurmd), jobs submitted through submitit: a sweep
summarised, the preemption signal with its requeue, a hard cancel found and resubmitted, a job
preempted by the high-priority partition. Every test runs on two clusters: one without accounting
whose preemption sends USR2 first (preempt_send_user_signal), and one with slurmdbd accounting
(MariaDB) whose preemption sends only SIGTERM, as on clusters without that setting."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import HANG_GUARD_S
from test_cluster import LONG, TINY, invoke, metric_steps, progress_step, wait_for

pytest.importorskip("submitit", reason="the cluster extra (pip install 'asl-cli[cluster]') is not installed")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_node.sh"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


CLUSTERS = {"no-accounting,usr2": [], "accounting,sigterm": ["--accounting", "--term-preemption"]}


@pytest.fixture(scope="module", params=list(CLUSTERS))
def slurm(request, tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("a one-node Slurm needs root and Debian's packages (scripts/slurm_node.sh)")
    d = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(["bash", str(SCRIPT), "start", str(d), *CLUSTERS[request.param]], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    if res.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
    if res.returncode == 3:
        pytest.skip(f"munge and Slurm could not be installed here: {res.stdout[-500:]}")
    if res.returncode == 4:
        pytest.skip(f"the accounting database (MariaDB) could not be started here: {res.stdout[-500:]}")
    assert res.returncode == 0, res.stdout + res.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    from asl_cli.experiments.sweeps import cluster

    cluster._slurm_accounting.cache_clear()  # asked once per process: this cluster may differ from the last
    assert cluster._slurm_accounting() == ("--accounting" in CLUSTERS[request.param])
    yield d
    subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
    subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "job.json").read_text())["job_id"]


def finished(run_dir: Path) -> bool:
    from asl_cli.experiments.sweeps.sweep import finished as done

    return done(Path(run_dir)) is not None


def squeue_state(jid: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True, timeout=60).stdout.strip()


def start_requeued_now(run_dir: Path) -> None:
    """Slurm holds a requeued job for about two minutes before it may start again; this lets it
    start now (nothing else changes: no call from the user resubmits it). Not in the second of
    the requeue: slurmd compares a credential's creation with the old one's revocation in whole
    seconds, and a job started within it is killed ("Job credential revoked") and never resumes."""
    jid = job_id(run_dir)
    wait_for(lambda: squeue_state(jid) == "PENDING" or finished(run_dir))
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True, timeout=60)


SLURM = ["--executor", "slurm", "--cpus-per-task", "1", "cluster.mem_gb=1"]


def start_long_run(tmp_path: Path) -> tuple[list[str], Path]:
    """A one-run sweep long enough to be caught mid-run, submitted and seen past step 30."""
    args = ["sweep", "quick", *LONG, *SLURM, "--root", "r", "--csv", "s.csv"]
    code, out = invoke(*args, "--no-wait")
    assert code == 0 and "submitted as job" in out, out
    run_dir = tmp_path / "r" / "base-seed0"
    wait_for(lambda: progress_step(run_dir) >= 30)
    return args, run_dir


def assert_stopped_mid_run_and_finished(run_dir: Path) -> None:
    """A checkpoint (with its shifts) mid-run, where the job was stopped, then the run to its end."""
    steps = pd.read_csv(run_dir / "shifts.csv")["step"].unique().tolist()
    assert steps[0] == 0 and steps[-1] == 400 and any(30 <= s < 400 for s in steps)
    assert metric_steps(run_dir) == [400]


def test_a_sweep_on_slurm_is_summarised_then_reused(slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quick", *TINY, "--axis", "optim.lr=0.05,0.1", *SLURM, "--root", "r", "--csv", "s.csv"]
    code, out = invoke(*args, "--no-wait")
    assert code == 0 and out.count("submitted as job") == 2, out
    wait_for(lambda: finished(tmp_path / "r" / "0.05-seed0") and finished(tmp_path / "r" / "0.1-seed0"))
    code, out = invoke(*args)  # every run done: the summary
    assert code == 0 and "submitted" not in out, out
    assert pd.read_csv("s.csv")["seeds"].tolist() == [1, 1]
    assert all(json.loads(p.read_text())["executor"] == "slurm" for p in Path("r").glob("*/job.json"))
    code, out = invoke(*args, "--status")
    assert code == 0 and out.count("done") == 2, out
    code, out = invoke(*args)
    assert code == 0 and "submitted" not in out, out


def test_the_preemption_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, run_dir = start_long_run(tmp_path)
    subprocess.run(["scancel", "--signal=USR2", job_id(run_dir)], check=True, timeout=60)
    start_requeued_now(run_dir)
    wait_for(lambda: finished(run_dir))  # the requeued job (Slurm holds it a while) ends the run
    code, out = invoke(*args)  # nothing to submit: the summary
    assert code == 0 and "submitted" not in out, out
    assert_stopped_mid_run_and_finished(run_dir)
    assert "Requeued job" in "".join(p.read_text() for p in (tmp_path / "r" / ".jobs").glob("*_log.out"))


def test_a_cancelled_job_is_resubmitted_by_the_next_call_and_resumes(slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quick", *LONG, "train.ckpt_every=50", *SLURM, "--root", "r", "--csv", "s.csv"]
    code, out = invoke(*args, "--no-wait")
    assert code == 0, out
    run_dir = tmp_path / "r" / "base-seed0"
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists() and progress_step(run_dir) >= 60)
    first = job_id(run_dir)
    subprocess.run(["scancel", "--signal=KILL", "--full", first], check=True, timeout=60)
    wait_for(lambda: squeue_state(first) == "")
    code, out = invoke(*args, "--status")  # sacct (or, without accounting, squeue) says the job is gone
    assert code == 0 and "interrupted" in out, out
    code, out = invoke(*args, "--no-wait")
    assert code == 0 and "resubmitted, resuming" in out, out
    wait_for(lambda: finished(run_dir))
    assert job_id(run_dir) != first and metric_steps(run_dir) == [400]
    shifts = pd.read_csv(run_dir / "shifts.csv")
    assert shifts.duplicated(["step", "layer", "channel"]).sum() == 0  # no step written twice


def test_a_job_preempted_by_the_high_partition_resumes_by_itself(slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, run_dir = start_long_run(tmp_path)
    # a job of the `high` partition that needs every CPU of the node: Slurm preempts (requeues) the run's job
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(os.cpu_count()), "--mem=256M", "-o", "/dev/null",
                           "--wrap", "sleep 2"], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    wait_for(lambda: squeue_state(high) == "")  # the high job ran and ended
    start_requeued_now(run_dir)
    wait_for(lambda: finished(run_dir))  # without any call from the user: the requeued job ends the run
    code, out = invoke(*args)  # nothing to submit: the summary
    assert code == 0 and "submitted" not in out, out
    assert_stopped_mid_run_and_finished(run_dir)
    assert pd.read_csv(tmp_path / "s.csv")["seeds"].tolist() == [1]
