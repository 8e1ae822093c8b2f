"""A run is reused or resumed only when it was trained with what the command asks for; results
committed to git are not replaced silently; one seed gives no statistics; plot-shifts picks a run
whose shifts move; a finished run folder keeps no lock file."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from asl_cli.cli import app
from asl_cli.config import load_config, training_differences
from asl_cli.errors import Interrupted
from asl_cli.train import engine
from conftest import HANG_GUARD_S

runner = CliRunner()
TINY = ["data.train_size=128", "data.test_size=64", "train.batch_size=32", "train.iterations=4", "train.eval_every=4",
        "train.ckpt_every=2", "train.eval_batch_size=64", "train.log_every=2"]


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), f"traceback: {res.exception!r}"
    return res.exit_code, " ".join(res.output.split())  # rich wraps long lines


def steps_trained(run: Path) -> int:
    return int(pd.read_csv(run / "metrics.csv")["step"].max())


# ---- which keys count ----
def test_only_keys_that_change_training_differ():
    base = load_config("quick", TINY)
    same = load_config("quick", TINY + ["train.log_every=1", "data.cache=none", "output.dir=elsewhere", "cluster.mem_gb=2",
                                        "train.compile=false", "name=other"])
    assert training_differences(base, same) == []
    explicit = load_config("quick", TINY + ["model.args.shift_mode=TR", "model.args.shift_seed=0"])  # the defaults, spelled out
    assert training_differences(base, explicit) == []
    other = load_config("quick", TINY + ["train.iterations=30", "model.args.shift_mode=SR", "optim.lr=0.2"])
    assert [k for k, _, _ in training_differences(base, other)] == ["model.args.shift_mode", "optim.lr", "train.iterations"]
    assert ("train.iterations", 4, 30) in training_differences(base, other)


# ---- sweeps and ablations: the pool (one and two workers), local and Slurm executors ----
@pytest.mark.parametrize("executor", [["--jobs", "1"], ["--jobs", "2"], ["--executor", "local"], ["--executor", "slurm"]],
                         ids=["pool-1", "pool-2", "local", "slurm"])
def test_a_run_trained_otherwise_stops_the_command(tmp_path, monkeypatch, executor):
    monkeypatch.chdir(tmp_path)
    if executor[0] == "--executor":
        pytest.importorskip("submitit", reason="the cluster extra is not installed")
    code, out = cli("ablate", "quick", *TINY, "--variant", "SR", "--root", "r", "--csv", "a.csv")
    assert code == 0, out
    code, out = cli("ablate", "quick", *TINY, "train.iterations=6", "--variant", "SR", "--root", "r", "--csv", "a.csv", *executor)
    assert code == 2, out
    assert "trained with other settings" in out and "train.iterations: 4 -> 6" in out and "--rerun" in out and "--root" in out
    assert steps_trained(tmp_path / "r" / "SR-seed0") == 4  # untouched
    assert not (tmp_path / "r" / "SR-seed0" / "job.json").exists()  # nothing submitted


def test_rerun_moves_the_old_run_aside_and_trains_anew(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("ablate", "quick", *TINY, "--variant", "SR", "--root", "r", "--csv", "a.csv")[0] == 0
    code, out = cli("ablate", "quick", *TINY, "train.iterations=6", "--variant", "SR", "--root", "r", "--csv", "a.csv", "--rerun")
    assert code == 0, out
    assert "moved aside" in out and "reused" not in out
    assert steps_trained(tmp_path / "r" / "SR-seed0") == 6
    (old,) = (tmp_path / "r").glob("SR-seed0.replaced-*")
    assert steps_trained(old) == 4
    assert "6 it x b32" in pd.read_csv("a.csv")["schedule"].iloc[0]


def test_a_run_differing_only_in_paths_and_logging_is_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("sweep", "quick", *TINY, "--root", "r", "--csv", "s.csv")[0] == 0
    code, out = cli("sweep", "quick", *TINY, "train.log_every=1", "data.cache=none", "--root", "r", "--csv", "s.csv")
    assert code == 0 and "finished earlier, reused" in out, out


def test_an_interrupted_run_trained_otherwise_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r" / "base-seed0"
    cfg = load_config("quick", TINY + ["train.iterations=8", f"output.dir={run}"])
    real_loop = engine._Run.loop

    def stop_at_step_two(self, stop):  # as if a signal came at step 2: a checkpoint, then Interrupted
        class Requests(dict):
            def __getitem__(req, key):
                return self.state.step >= 2 if key == "flag" else dict.__getitem__(req, key)

        real_loop(self, Requests(stop))

    monkeypatch.setattr(engine._Run, "loop", stop_at_step_two)
    with pytest.raises(Interrupted):
        engine.train(cfg)
    monkeypatch.setattr(engine._Run, "loop", real_loop)
    code, out = cli("sweep", "quick", *TINY, "optim.lr=0.05", "--root", "r", "--csv", "s.csv")
    assert code == 2 and "optim.lr: 0.1 -> 0.05" in out, out


# ---- asl train --resume ----
def test_resume_refuses_overrides_that_change_training_and_takes_the_others(tmp_path):
    run = tmp_path / "run"
    code, out = cli("train", "quick", *TINY, "train.iterations=6", f"output.dir={run}")
    assert code == 0, out
    code, out = cli("train", "--resume", run, "optim.lr=0.3")
    assert code == 2 and "optim.lr: 0.1 -> 0.3" in out and "--init-from" in out, out
    code, out = cli("train", "--resume", run, "train.log_every=1")
    assert code == 0 and "nothing left to train" in out, out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["log_every"] == 1
    code, out = cli("train", "quick", *TINY, "--resume", run)  # the recipe with other iterations
    assert code == 2 and "train.iterations: 6 -> 4" in out, out


def test_a_finished_run_keeps_no_lock_file(tmp_path):
    run = tmp_path / "run"
    assert cli("train", "quick", *TINY, f"output.dir={run}")[0] == 0
    assert not (run / ".lock").exists()


# ---- results files ----
def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_committed_results_file_is_written_beside_not_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("results").mkdir()
    Path("results/ablate_quick.csv").write_text("variant,top1_mean\nSR,1.0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "results/ablate_quick.csv")
    _git(tmp_path, "commit", "-q", "-m", "a result")
    code, out = cli("ablate", *TINY, "--variant", "SR")  # the card's line, with a shorter schedule
    assert code == 0, out
    assert Path("results/ablate_quick.csv").read_text() == "variant,top1_mean\nSR,1.0\n"
    assert "committed result" in out and "results/ablate_quick.local.csv" in out
    assert pd.read_csv("results/ablate_quick.local.csv")["variant"].tolist() == ["SR"]
    assert Path("results/ablate_quick.local.png").exists()
    code, out = cli("ablate", *TINY, "--variant", "SR", "--overwrite")
    assert code == 0 and "reused" in out, out
    assert "top1_ci95_low" in Path("results/ablate_quick.csv").read_text()


def test_replacing_an_uncommitted_results_file_is_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("ablate", *TINY, "--variant", "SR")[0] == 0
    code, out = cli("ablate", *TINY, "--variant", "SR")
    assert code == 0 and "replaced the earlier results/ablate_quick.csv" in out, out


# ---- statistics with one seed ----
def test_one_seed_gives_no_interval_and_no_test_against_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("ablate", *TINY, "--variant", "SR,TR", "--csv", "a.csv")
    assert code == 0, out
    df = pd.read_csv("a.csv")
    for col in ("top1_std", "top1_ci95_low", "top1_ci95_high", "p_welch"):
        assert df[col].isna().all(), col
    tr = df[df["variant"] == "TR"].iloc[0]
    assert pd.isna(tr["diff_vs_baseline"]) and tr["baseline"] == "TR"
    assert not pd.isna(df[df["variant"] == "SR"]["diff_vs_baseline"].iloc[0])
    assert "n/a" in out and "baseline" in out and "± 0.00" not in out and "p=nan" not in out


# ---- plot-shifts' default run ----
def test_plot_shifts_prefers_the_newest_run_with_learned_shifts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", "quick", *TINY, "output.dir=runs/learned")[0] == 0
    assert cli("train", "quick", *TINY, "model.args.shift_mode=SR", "output.dir=runs/fixed")[0] == 0
    code, out = cli("plot-shifts")
    assert code == 0, out
    assert "newest run with learned shifts: runs/learned" in out and "fixed SR shifts" in out
    code, out = cli("plot-shifts", "runs/fixed")
    assert code == 0 and "fixed, so the movement figure shows no movement" in out, out


# ---- no CUDA talk on a machine without one ----
def test_importing_the_package_silences_torchs_cuda_home_warning():
    out = subprocess.run([sys.executable, "-c", "import asl_cli, torch.utils.cpp_extension, torch._inductor.cpp_builder"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert "No CUDA runtime is found" not in out.stderr
