"""Sweeps as cluster jobs through submitit's local executor: real subprocesses, pickled work, job
folders, the preemption signal and requeue, a killed job resubmitted by the same command."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from asl_cli.cli import app
from asl_cli.config import ConfigError
from asl_cli.experiments.sweeps import cluster
from asl_cli.experiments.sweeps.sweep import plan
from conftest import HANG_GUARD_S

pytest.importorskip("submitit", reason="the cluster extra (pip install 'asl-cli[cluster]') is not installed")

runner = CliRunner()
TINY = ["data.train_size=128", "data.test_size=64", "train.batch_size=32", "train.iterations=4", "train.eval_every=2",
        "train.ckpt_every=2", "train.log_every=2", "train.eval_batch_size=64"]
# long enough to be caught mid-run: about ten seconds of steps on one core
LONG = ["data.train_size=256", "data.test_size=64", "train.batch_size=32", "train.iterations=400", "train.eval_every=400",
        "train.ckpt_every=1000", "train.log_every=5", "train.eval_batch_size=64"]


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), f"traceback: {res.exception!r}"
    return res.exit_code, res.output


def wait_for(check, seconds=HANG_GUARD_S):
    end = time.time() + seconds
    while time.time() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def progress_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text()).get("step", 0)
    except (OSError, ValueError):
        return 0


def metric_steps(run_dir: Path) -> list[int]:
    return pd.read_csv(run_dir / "metrics.csv")["step"].tolist()


def test_a_sweep_as_local_jobs_is_summarised_then_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quick", *TINY, "--axis", "optim.lr=0.05,0.1", "--executor", "local", "--root", "r", "--csv", "s.csv"]
    code, out = invoke(*args, "--wait")
    assert code == 0, out
    summary = pd.read_csv("s.csv", dtype={"cell": str})
    assert summary["cell"].tolist() == ["0.05", "0.1"] and summary["seeds"].tolist() == [1, 1]
    jobs = {p.parent.name: json.loads(p.read_text()) for p in Path("r").glob("*/job.json")}
    assert set(jobs) == {"0.05-seed0", "0.1-seed0"} and all(j["executor"] == "local" for j in jobs.values())
    assert list(Path("r/.jobs").glob("*_log.out"))  # submitit's logs
    code, out = invoke(*args)  # nothing left to submit: the summary is written again at once
    assert code == 0 and "submitted" not in out, out
    assert {p.parent.name: json.loads(p.read_text()) for p in Path("r").glob("*/job.json")} == jobs
    code, out = invoke(*args, "--status")
    assert code == 0 and out.count("done") == 2, out


@pytest.mark.skipif(sys.platform != "linux", reason="finds the job's process through /proc")
def test_a_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    (run,) = plan("quick", LONG, [], 1, tmp_path / "r")
    jobs = cluster.submit("quick", [run], "local", cluster.Resources(timeout_min=60), tmp_path / "jobs", print)
    (job,) = jobs.values()
    wait_for(lambda: progress_step(run.run_dir) >= 30)
    (task,) = _children(int(job.job_id))  # the job's process under submitit's local controller
    os.kill(task, signal.SIGUSR2)  # submitit's preemption / time-limit signal, as Slurm sends it
    job.result()  # the requeued job finishes the run
    steps = pd.read_csv(run.run_dir / "shifts.csv")["step"].unique().tolist()
    assert len(steps) == 3 and steps[0] == 0 and 30 <= steps[1] < 400 and steps[2] == 400  # saved at the signal
    assert metric_steps(run.run_dir) == [400]
    assert "Calling checkpoint method" in job.stdout() and "Requeued job" in job.stdout()


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]


def _kill_tree(pid: int) -> None:
    for c in _children(pid):
        _kill_tree(c)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.skipif(sys.platform != "linux", reason="finds the job's processes through /proc")
def test_a_killed_job_is_resubmitted_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quick", *LONG, "train.ckpt_every=50", "--executor", "local", "--root", "r", "--csv", "s.csv"]
    code, out = invoke(*args, "--no-wait")
    assert code == 0 and "submitted as job" in out and "still queued or running" in out, out
    run_dir = tmp_path / "r" / "base-seed0"
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists() and progress_step(run_dir) >= 60)
    first_job = json.loads((run_dir / "job.json").read_text())["job_id"]
    _kill_tree(int(first_job))  # the node died: no signal, no last checkpoint
    code, out = invoke(*args, "--status")
    assert code == 0 and "interrupted" in out, out
    code, out = invoke(*args, "--wait")
    assert code == 0 and "resubmitted, resuming" in out, out
    assert json.loads((run_dir / "job.json").read_text())["job_id"] != first_job
    assert metric_steps(run_dir) == [400]
    shifts = pd.read_csv(run_dir / "shifts.csv")
    assert sorted(shifts["step"].unique()) == [0] + list(range(50, 401, 50))
    assert shifts.duplicated(["step", "layer", "channel"]).sum() == 0  # no step written twice
    assert pd.read_csv("s.csv")["seeds"].tolist() == [1]


def test_a_failing_job_shows_its_error_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = invoke("sweep", "quick", *TINY, "--axis", "data.train_size=10,128", "--executor", "local", "--wait", "--root", "r",
                       "--csv", "s.csv")
    assert code == 1 and "fewer than one batch" in out.replace("\n", " "), out
    summary = pd.read_csv("s.csv")
    assert summary["seeds"].tolist() == [0, 1]
    assert "fewer than one batch" in summary["failed_runs"].iloc[0]


def test_the_debug_executor_runs_the_jobs_in_this_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = invoke("ablate", "quick", *TINY, "--variant", "SR,TR", "--executor", "debug", "--root", "r", "--csv", "a.csv")
    assert code == 0, out
    assert pd.read_csv("a.csv")["variant"].tolist() == ["SR", "TR"]


def test_without_submitit_the_message_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)
    code, out = invoke("sweep", "quick", *TINY, "--executor", "local", "--root", "r")
    assert code == 2 and "pip install 'asl-cli[cluster]'" in out, out
    code, out = invoke("sweep", "quick", *TINY, "--executor", "slurm", "--root", "r")
    assert code == 2, out


def test_resources_come_from_the_recipe_then_the_command_line():
    from asl_cli.config import load_config

    cfg = load_config("quick", ["cluster.partition=gpu", "cluster.gpus_per_node=4", "cluster.timeout_min=60"])
    r = cluster.Resources.from_config(cfg, timeout_min=30, partition=None)
    assert (r.partition, r.gpus_per_node, r.timeout_min, r.nodes) == ("gpu", 4, 30, 1)
    assert cluster.Resources.from_config(cfg, mem_gb=2.5).mem_gb == 2.5
    with pytest.raises(ConfigError, match="out of range"):
        cluster.Resources.from_config(load_config("quick", ["cluster.mem_gb=0"]))


def test_mem_gb_on_the_command_line_reaches_the_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_submit(recipe, runs, executor, res, folder, on_status):
        seen["res"] = res
        for r in runs:
            r.state = "pending"
        return {}

    monkeypatch.setattr(cluster, "submit", fake_submit)
    code, out = invoke("sweep", "quick", *TINY, "--executor", "local", "--root", "r", "--mem-gb", "3", "--no-wait")
    assert code == 0, out
    assert seen["res"].mem_gb == 3.0
    code, out = invoke("sweep", "quick", *TINY, "--executor", "local", "--root", "r", "--mem-gb", "0")
    assert code == 2, out


def test_progress_and_elapsed_time_count_every_attempt(tmp_path):
    from asl_cli.experiments.sweeps.sweep_worker import mark_resubmitted, progress_writer

    path = tmp_path / "progress.json"
    first = progress_writer(path)
    first["on_start"]({"start": 0, "total": 100, "device": "cpu"})
    first["on_step"](40, 100, {"top1": 50.0, "images_per_s": 10.0})
    rec = json.loads(path.read_text())
    rec["elapsed_s"] = 30.0  # as if the first attempt had trained for 30 s
    path.write_text(json.dumps(rec))
    mark_resubmitted(path)  # a new job: no progress of its own yet, the time so far kept
    assert json.loads(path.read_text()) == {"elapsed_s": 30.0, "attempts": 1}
    second = progress_writer(path)
    second["on_start"]({"start": 40, "total": 100, "device": "cpu"})
    rec = json.loads(path.read_text())
    assert rec["step"] == 40 and rec["attempts"] == 2 and 30.0 <= rec["elapsed_s"] < 30.0 + HANG_GUARD_S


@pytest.mark.parametrize("listed, rc, stderr, alive", [("RUNNING\n", 0, "", True), ("", 0, "", False),
                                                         ("", 1, "slurm_load_jobs error: Invalid job id specified", False),
                                                         ("", 1, "slurm_load_jobs error: Unable to contact slurm controller", True)])
def test_without_accounting_a_job_is_alive_while_squeue_lists_it(tmp_path, monkeypatch, listed, rc, stderr, alive):
    """submitit asks sacct, which fails without slurmdbd (state UNKNOWN); squeue then decides, so a
    dead job is resubmitted by the next call instead of showing as running forever."""
    import subprocess
    import types

    from asl_cli.experiments.sweeps import cluster

    class FakeJob:
        def __init__(self, folder, job_id):
            self.state = "UNKNOWN"

    monkeypatch.setattr(cluster, "_submitit", lambda: types.SimpleNamespace(SlurmJob=FakeJob))
    monkeypatch.setattr(cluster, "_slurm_accounting", lambda: True)  # sacct is there but cannot tell
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, rc, listed, stderr)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert cluster._job_alive({"executor": "slurm", "job_id": "42", "folder": str(tmp_path)}) is alive
    assert calls and calls[0][:4] == ["squeue", "-h", "-j", "42"]
