"""Sweep runs as cluster jobs through submitit: every (cell, seed) run is one job (Slurm where
`srun` exists; submitit's `local` executor runs the same jobs as subprocesses of this machine and
`debug` in this process). A job trains with the trainer's own resume: a requeued or resubmitted
job continues from its run folder's last checkpoint, and a job told it is about to be preempted or
to time out (submitit's signal, USR2) first saves a checkpoint at the current step, then asks
submitit to requeue it. Where a job stands is read from its run folder (checkpoints,
progress.json) and `job.json` (executor, job id, submitit's log folder), so a later command can
show it, reuse it or resubmit it."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...config import ConfigError
from .sweep import Run, finished, log_tail, prepare, read_progress
from .sweep_worker import mark_resubmitted, progress_writer

EXECUTORS = ("cluster", "slurm", "local", "debug")
JOB_FILE = "job.json"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("the cluster executors need submitit: pip install 'asl-cli[cluster]' (or pip install submitit)") from None
    return submitit


@dataclass
class Resources:
    """What one run's job asks for; the recipe's `cluster:` section, then the command line."""

    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    nodes: int = 1
    mem_gb: float | None = None

    @classmethod
    def from_config(cls, cfg: dict, **given) -> "Resources":
        values = {**cfg.get("cluster", {}), **{k: v for k, v in given.items() if v is not None}}
        r = cls(**values)
        if (r.timeout_min < 1 or r.gpus_per_node < 0 or r.nodes < 1 or (r.cpus_per_task is not None and r.cpus_per_task < 1)
                or (r.mem_gb is not None and r.mem_gb <= 0)):
            raise ConfigError(f"cluster resources out of range: {r}")
        return r


def resolve_executor(name: str) -> str:
    """`cluster` is Slurm where its commands are installed, else submitit's local executor."""
    if name not in EXECUTORS:
        raise ConfigError(f"--executor must be pool, {', '.join(EXECUTORS)}; got {name!r}")
    if name == "cluster":
        return "slurm" if shutil.which("srun") or shutil.which("sbatch") else "local"
    if name == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("--executor slurm needs Slurm's sbatch on PATH; use --executor local to run the jobs on this machine")
    return name


def make_executor(kind: str, folder: Path, res: Resources, name: str):
    submitit = _submitit()
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=kind)
    tasks = max(1, res.gpus_per_node)  # one task per GPU: DistributedDataParallel inside the job
    params = dict(name=name, timeout_min=res.timeout_min, tasks_per_node=tasks, nodes=res.nodes)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if res.partition:
        params["slurm_partition"] = res.partition
    if kind == "slurm":  # requeued by a preemption even where the cluster's JobRequeue default is 0
        params["slurm_additional_parameters"] = {"requeue": True}
    ex.update_parameters(**params)
    return ex


def _preempt_signal() -> int:
    # submitit's own rule (SUBMITIT_PREEMPT_SIGNAL, default USR2) for the signal it sends before a
    # time limit or a preemption
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class TrainJob:
    """The callable a job runs: train one run in its folder, resuming from its last checkpoint.
    submitit calls `checkpoint` when the job is to be requeued; the same call then resumes."""

    def __call__(self, recipe: str, overrides: list[str], run_dir: str) -> dict:
        from ...config import load_config
        from ...errors import Interrupted
        from ...train import STOP_SIGNALS, Callbacks, RunFolder
        from ...train import train as run_training

        submitit = _submitit()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # the same environment variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR...)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        folder = RunFolder(run_dir)
        resume = folder.path if folder.has_checkpoint() else None
        cfg = folder.load_config() if resume else load_config(recipe, overrides)
        main = env.global_rank == 0
        callbacks = Callbacks(**progress_writer(folder.progress)) if main else None
        requeue = signal.getsignal(_preempt_signal())  # submitit's handler: checkpoint() and requeue
        try:
            return run_training(cfg, resume=resume, callbacks=callbacks, stop_signals=STOP_SIGNALS + (_preempt_signal(),))
        except Interrupted as e:
            if e.signum == _preempt_signal() and callable(requeue):
                import subprocess

                try:
                    requeue(e.signum, None)  # exits this process; the requeued job resumes at e.step
                except subprocess.CalledProcessError:
                    # `scontrol requeue` refused: a preemption in PreemptMode=REQUEUE, where Slurm
                    # requeues the job itself (this one ends; the requeued one resumes at e.step)
                    print(f"the job was not requeued by itself: Slurm requeues it (preempted); checkpoint at step {e.step}",
                          file=sys.stderr, flush=True)
            raise

    def checkpoint(self, recipe: str, overrides: list[str], run_dir: str):
        return _submitit().helpers.DelayedSubmission(TrainJob(), recipe, overrides, run_dir)


# ---------------------------------------------------------------------------------------------
# the grid's state
# ---------------------------------------------------------------------------------------------
def read_job(run: Run) -> dict:
    try:
        return json.loads((run.run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def job_alive(run: Run) -> bool:
    """Whether a job recorded for the run is still queued or running."""
    return _job_alive(read_job(run))


def _job_alive(info: dict) -> bool:
    """Whether the job recorded in job.json is still queued or running."""
    if not info:
        return False
    if info["executor"] == "local":  # the job id is the pid of submitit's controller process
        return _local_job_alive(int(info["job_id"]))
    if info["executor"] == "slurm":
        if not _slurm_accounting():  # submitit would ask sacct, which fails there (and says so on stderr)
            return _in_squeue(str(info["job_id"]))
        submitit = _submitit()
        state = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"]).state
        if state == "UNKNOWN":  # sacct could not tell
            return _in_squeue(str(info["job_id"]))
        return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")
    return False


@functools.lru_cache(maxsize=1)
def _slurm_accounting() -> bool:
    """Whether the cluster keeps job accounting (slurmdbd), i.e. whether sacct can answer."""
    import subprocess

    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True
    for line in res.stdout.splitlines():
        if line.split("=")[0].strip() == "AccountingStorageType":
            return "accounting_storage/none" not in line
    return True


def _in_squeue(job_id: str) -> bool:
    """Whether Slurm's queue still lists the job (pending, running, requeued...). A job that has
    left the queue is over; when squeue cannot be asked, the job is taken as alive (never
    submitted twice)."""
    import subprocess

    try:
        res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if res.returncode != 0:  # "Invalid job id specified": the job has left the queue
        return "invalid job id" not in (res.stderr + res.stdout).lower()
    return bool(res.stdout.strip())


def _local_job_alive(pid: int) -> bool:
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():  # no /proc: whether the pid exists at all
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"submitit" in cmdline  # not a dead child awaiting its parent, nor a reused pid


def _job_error(info: dict, lines: int = 3) -> str:
    """The end of the job's stderr as submitit kept it."""
    logs = sorted(Path(info.get("folder", "")).glob(f"{info.get('job_id')}_*_log.err")) if info else []
    return log_tail(logs, lines, skip="submitit") or "the job ended without finishing the run"


def refresh(runs: list[Run]) -> None:
    """Sets each run's state from its folder and job record (no job is submitted)."""
    for r in runs:
        info = read_job(r)
        r.progress = read_progress(r.run_dir)
        if finished(r.run_dir) is not None:
            r.state = "done"
        elif _job_alive(info):
            r.state = "running" if "step" in r.progress else "pending"
            r.message = f"job {info['job_id']}"
        elif info:
            _ended_unfinished(r, info)
        else:
            r.state = "queued"


def _ended_unfinished(r: Run, info: dict) -> None:
    """A run whose job ended before the run did: interrupted when it left a checkpoint (the next
    call resubmits it and it resumes there), else failed; the job's error either way."""
    if r.folder.has_checkpoint():
        step = r.progress.get("step") if r.progress else None
        where = f" at step {step}" if step else ""
        r.state, r.message = "interrupted", f"stopped{where}; the next call resumes it from its checkpoint ({_job_error(info)})"
    else:
        r.state, r.message = "failed", _job_error(info)


def submit(recipe: str, runs: list[Run], executor: str, res: Resources, folder: Path, on_status: Callable[[str], None]) -> dict:
    """Submits a job for every run that is neither finished nor still in a live job; returns the
    submitit jobs by run folder."""
    kind = resolve_executor(executor)
    ex = None
    jobs = {}
    for r in runs:
        if r.state in ("done", "reused", "running", "pending"):
            continue
        resume = prepare(r)
        r.run_dir.mkdir(parents=True, exist_ok=True)
        mark_resubmitted(r.folder.progress)
        ex = ex or make_executor(kind, folder, res, f"asl-{Path(recipe).stem}")
        job = ex.submit(TrainJob(), recipe, r.overrides, str(r.run_dir))
        info = {"executor": kind, "job_id": str(job.job_id), "folder": str(folder.resolve()), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (r.run_dir / JOB_FILE).write_text(json.dumps(info))
        r.state, r.message = "pending", f"job {job.job_id}"
        jobs[str(r.run_dir)] = job
        on_status(f"{r.cell} seed {r.seed}: {'resubmitted, resuming' if resume else 'submitted'} as job {job.job_id} "
                  f"({kind}; logs in {folder})")
    return jobs


def wait(runs: list[Run], jobs: dict, on_tick: Callable[[list[Run]], None], poll_s: float = 2.0) -> None:
    """Waits for the jobs submitted now and for those an earlier call left queued or running (a
    requeued job included), keeping the runs' states current."""
    by_dir = {str(r.run_dir): r for r in runs}
    watched = {k for k, r in by_dir.items() if k in jobs or r.state in ("running", "pending")}
    pending = set(watched)
    while pending:
        for key in list(pending):
            info, job = read_job(by_dir[key]), jobs.get(key)
            # a Slurm job is over when Slurm no longer has it (a requeued job is still there); asking
            # submitit would take its first attempt's result for the end of the job
            over = not _job_alive(info) if info.get("executor") == "slurm" or job is None else job.done()
            if over:
                pending.discard(key)
        refresh([by_dir[k] for k in watched])
        for key in watched - pending:  # a job still running as far as its record goes, but it ended
            r = by_dir[key]
            if r.state in ("running", "pending"):
                if finished(r.run_dir) is not None:
                    r.state = "done"
                else:
                    _ended_unfinished(r, read_job(r))
        on_tick(runs)
        if pending:
            time.sleep(poll_s)


