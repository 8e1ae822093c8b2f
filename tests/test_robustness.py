"""Run folders that never mix or lose data, checkpoints that are verified, and bad input that ends
in one clear message (never a traceback)."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from asl_cli.train import checkpoint as ckpt_io
from asl_cli.train import engine
from asl_cli.cli import app
from asl_cli.config import ConfigError, load_config
from asl_cli.data import DataError, npz
from asl_cli.train.run_lock import RunLock

runner = CliRunner()
TINY = ["data.train_size=128", "data.test_size=64", "train.batch_size=32", "train.iterations=4", "train.eval_every=2",
        "train.ckpt_every=2", "train.log_every=2", "train.eval_batch_size=64"]


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    text = res.output.replace("\n", " ")
    assert res.exception is None or isinstance(res.exception, SystemExit), f"traceback: {res.exception!r}"
    return res.exit_code, text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("done") / "run"
    engine.train(load_config("quick", TINY + [f"output.dir={run}"]))
    return run


# ---- run folders ----
def test_a_second_run_into_a_busy_folder_refuses(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()  # another process training there
    try:
        code, out = cli("train", "quick", *TINY, f"output.dir={run}")
        assert code == 1 and "in use by another training process" in out
        assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
    finally:
        lock.release()
    code, out = cli("train", "quick", *TINY, f"output.dir={run}")  # free again
    assert code == 0, out


def test_kill_while_writing_best_is_repaired_on_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_eval, real_save, n = engine.evaluate, ckpt_io.save_atomic, {"evals": 0}

    def improving_eval(*a, **k):  # every evaluation is a new best
        r = real_eval(*a, **k)
        n["evals"] += 1
        r["test_top1"] = 10.0 * n["evals"]
        return r

    def killed_at_best(obj, path):  # the process dies while best.pt of step 4 is being written
        if Path(path).name == "best.pt" and obj["step"] == 4:
            Path(path).with_name(".best.pt.tmp-4242").write_bytes(b"partial")
            raise SystemExit(137)
        return real_save(obj, path)

    monkeypatch.setattr(engine, "evaluate", improving_eval)
    monkeypatch.setattr(ckpt_io, "save_atomic", killed_at_best)
    with pytest.raises(SystemExit):
        engine.train(load_config("quick", TINY + [f"output.dir={run}"]))
    assert ckpt_io.load(run / "checkpoints" / "best.pt")["step"] == 2  # stale
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [2]  # the step-4 row was lost
    monkeypatch.setattr(ckpt_io, "save_atomic", real_save)
    engine.train(load_config(str(run / "config.yaml")), resume=run)
    best = ckpt_io.load(run / "checkpoints" / "best.pt")
    assert best["step"] == 4 and best["best_top1"] == 20.0
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [2, 4]
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_first_evaluation_row_is_restored_when_metrics_csv_is_missing(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.csv").unlink()
    engine.train(load_config(str(run / "config.yaml")), resume=run)
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [4]


def test_corrupted_weights_are_detected(tmp_path, finished_run):
    ck = torch.load(finished_run / "checkpoints" / "best.pt", weights_only=True)
    ck["model_state"]["fc.weight"][0, 0] += 1.0  # bytes changed after the checksum was written
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
        ckpt_io.load(tmp_path / "bad.pt")
    code, out = cli("eval", tmp_path / "bad.pt", "--no-latency", "--csv", tmp_path / "e.csv")
    assert code == 1 and "checksum" in out


def test_resume_needs_training_state(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for k in ("optimizer", "scheduler"):
        ck.pop(k)
    torch.save(ck, run / "checkpoints" / "last.pt")
    code, out = cli("train", "--resume", run)
    assert code == 1 and "no training state" in out and "--init-from" in out


def test_unknown_model_in_checkpoint(tmp_path, finished_run):
    ck = torch.load(finished_run / "checkpoints" / "best.pt", weights_only=True)
    ck["model_name"] = "asnet_does_not_exist"
    ckpt_io.save_atomic(ck, tmp_path / "x.pt")
    code, out = cli("eval", tmp_path / "x.pt", "--no-latency")
    assert code == 1 and "cannot build" in out


# ---- values that used to be accepted silently ----
@pytest.mark.parametrize("override", [
    "train.iterations=-5", "train.iterations=0", "train.epochs=0", "data.test_size=0", "schedule.gamma=-0.1",
    "optim.weight_decay=-1", "optim.shift_lr_mult=-1", "optim.momentum=-1", "optim.momentum=1", "schedule.milestones=[a,b]",
    "schedule.milestones=[300,100]", "optim.lr=", "optim.lr=nan",
])
def test_nonsense_values_are_refused(override):
    with pytest.raises(ConfigError):
        load_config("quick", [override])


def test_numbers_typed_as_users_type_them():
    cfg = load_config("quick", ["optim.lr=1e-3", "train.iterations=2e3"])
    assert cfg["optim"]["lr"] == 0.001 and cfg["train"]["iterations"] == 2000


def _npz(path, y_train, n_test=4):
    x = np.zeros((len(y_train), 8, 8, 3), np.uint8)
    np.savez(path, x_train=x, y_train=np.asarray(y_train), x_test=np.zeros((n_test, 8, 8, 3), np.uint8),
             y_test=np.zeros(n_test, np.int64))
    return path


def test_npz_labels_must_be_class_numbers(tmp_path):
    with pytest.raises(DataError, match="largest label is 50000"):
        npz(str(_npz(tmp_path / "a.npz", [0, 1, 50000, 1])))
    with pytest.raises(DataError, match="x_test holds no images"):
        npz(str(_npz(tmp_path / "b.npz", [0, 1, 1, 0], n_test=0)))


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_predict_refuses_images_deeper_than_8_bits(tmp_path, finished_run, mode):
    arr = np.full((16, 16), 40000 if mode == "I;16" else 0.5, np.uint16 if mode == "I;16" else np.float32)
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    Image.fromarray(arr).save(path)
    code, out = cli("predict", finished_run, path)
    assert code == 1 and "8-bit" in out


# ---- messages, not tracebacks ----
@pytest.mark.parametrize("command", ["eval", "predict", "plot-shifts", "resume", "init-from", "profile"])
def test_zero_byte_checkpoint(tmp_path, command):
    empty = tmp_path / "empty.pt"
    empty.touch()
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").touch()
    shutil.copy(Path(load_config("quick")["_source"]), run / "config.yaml")
    args = {"eval": ["eval", empty, "--no-latency"], "predict": ["predict", empty, img], "plot-shifts": ["plot-shifts", empty],
            "resume": ["train", "--resume", run], "init-from": ["train", "quick", *TINY, "--init-from", empty],
            "profile": ["profile", "models", empty, "--min-run-time", "0.01"]}[command]
    code, out = cli(*args)
    assert code in (1, 2) and "empty file" in out, out


@pytest.mark.parametrize("command", ["train", "eval", "plot-shifts", "profile", "ablate"])
def test_unwritable_output_paths(tmp_path, finished_run, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub"
    args = {"train": ["train", "quick", *TINY, f"output.dir={bad}"],
            "eval": ["eval", finished_run, "--no-latency", "--csv", bad / "e.csv"],
            "plot-shifts": ["plot-shifts", finished_run, "--out", bad],
            "profile": ["profile", "layers", "relu", "--shape", "1x2x4x4", "--min-run-time", "0.01", "--out", bad / "p.csv"],
            "ablate": ["ablate", "quick", *TINY, "--variant", "TR", "--root", bad]}[command]
    code, out = cli(*args)
    assert code == 1 and "Not a directory" in out, out


def test_broken_recipes(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "folder.yaml").mkdir()
    for path in ("bin.yaml", "folder.yaml"):
        with pytest.raises(ConfigError):
            load_config(str(tmp_path / path))


def test_training_set_smaller_than_a_batch():
    code, out = cli("train", "quick", "data.train_size=10", "train.batch_size=32", "train.iterations=1")
    assert code == 1 and "fewer than one batch" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_eval_on_cuda_without_a_gpu(finished_run):
    code, out = cli("eval", finished_run, "--device", "cuda", "--no-latency")
    assert code == 2 and "no" in out and "GPU" in out  # a bad option for this machine: a usage error


def test_jit_script_says_what_to_use_instead():
    from asl_cli.zoo import create_model

    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.script(create_model("asnet20_16x1"))


def test_ablate_with_a_zero_byte_checkpoint_in_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "TR-seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").touch()
    code, out = cli("ablate", "quick", *TINY, "--variant", "TR", "--root", tmp_path / "runs", "--csv", tmp_path / "a.csv")
    assert code == 1 and "empty file" in out, out


# ---- no silent wrong answer, no traceback on the recovery path ----
def test_a_diverging_run_never_keeps_a_nan_model(tmp_path):
    run = tmp_path / "run"
    code, out = cli("train", "quick", *TINY, "optim.lr=500", "schedule.warmup=0", f"output.dir={run}")
    assert code == 3 and "non-finite" in out and "no checkpoint had been written" in out, out
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "checkpoints" / "last.pt").exists()


def test_eval_of_a_diverged_checkpoint_is_an_error(tmp_path, finished_run):
    ck = ckpt_io.load(finished_run / "checkpoints" / "best.pt")
    ck["model_state"]["fc.weight"].fill_(float("nan"))
    ckpt_io.save_atomic({k: v for k, v in ck.items() if k != "_path"}, tmp_path / "nan.pt")
    code, out = cli("eval", tmp_path / "nan.pt", "--no-latency", "--csv", tmp_path / "e.csv")
    assert code == 1 and "non-finite outputs" in out and "diverged" in out, out
    assert not (tmp_path / "e.csv").exists()


@pytest.mark.parametrize("log", ["metrics.csv", "shifts.csv"])
@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_resume_with_a_damaged_log(tmp_path, finished_run, log, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = (run / "config.yaml").read_text().replace("iterations: 4", "iterations: 6")
    (run / "config.yaml").write_text(cfg)
    (run / log).write_bytes(b"" if damage == "empty" else b"\x00\xff no,columns\n1,2\n")
    code, out = cli("train", "--resume", run)
    assert code == 0, out
    assert "resuming from the checkpoint at step 4 of 6" in out
    rows = pd.read_csv(run / log)
    assert rows["step"].max() == 6 and (rows["step"] > 4).any()


@pytest.mark.parametrize("damage", [b"", b"step,layer\n0,a\n", b"\x00\x01\x02"])
def test_plot_shifts_with_a_damaged_history(tmp_path, finished_run, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "shifts.csv").write_bytes(damage)
    code, out = cli("plot-shifts", run, "--out", tmp_path / "fig")
    assert code == 0 and "warning" in out and "no shift movement figure" in out, out
    assert (tmp_path / "fig" / "shifts.png").exists() and not (tmp_path / "fig" / "shift_movement.png").exists()


def test_plot_shifts_defaults_to_the_newest_run(tmp_path, finished_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("plot-shifts")
    assert code == 1 and "no run with a checkpoint under runs/" in out and "asl train" in out
    shutil.copytree(finished_run, tmp_path / "runs" / "old")
    shutil.copytree(finished_run, tmp_path / "runs" / "ablate-x" / "TR-seed0")
    (tmp_path / "runs" / "ablate-x" / "TR-seed0" / "checkpoints" / "last.pt").touch()  # the newest
    code, out = cli("plot-shifts")
    assert code == 0 and "TR-seed0" in out, out
    assert (tmp_path / "results" / "shifts" / "TR-seed0" / "shifts.png").exists()


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, out = cli("train", "--resume", run)
    assert code == 0 and "nothing left to train" in out, out


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    code, out = cli("train", "quick", "data.dataset=folder", f"data.path={tmp_path / 'missing'}", f"output.dir={run}")
    assert code == 1 and not run.exists(), out
    code, out = cli("train", "quick", "train.batch_size=5000", "data.train_size=100", f"output.dir={run}")
    assert code == 1 and "fewer than one batch" in out and not run.exists(), out


def test_a_run_folder_without_a_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    code, out = cli("eval", tmp_path / "run", "--no-latency")
    assert code == 1 and "run folder with no checkpoint yet" in out and "is it a run folder" not in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages shown without a GPU")
@pytest.mark.parametrize("args", [("profile", "op", "--device", "cuda"), ("profile", "--layer", "relu", "--device", "cuda"),
                                  ("train", "quick", *TINY, "train.device=cuda"), ("train", "quick", *TINY, "train.device=tpu")])
def test_a_device_this_machine_lacks_is_a_usage_error(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli(*args)
    assert code == 2 and ("GPU" in out or "cuda" in out), out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ablate_refuses_a_baseline_it_does_not_train(tmp_path):
    code, out = cli("ablate", "quick", *TINY, "--variant", "SR", "--baseline", "ZZ", "--root", tmp_path / "r", "--csv", tmp_path / "a.csv")
    assert code == 2 and "--baseline 'ZZ' is not among the variants trained (SR)" in out, out


def test_progress_lines_without_a_terminal(tmp_path):
    code, out = cli("train", "quick", *TINY, "train.log_every=1", f"output.dir={tmp_path / 'run'}")
    assert code == 0 and all(f"step       {i}/4  loss" in out for i in range(1, 5)), out


def test_tables_stay_whole_in_80_columns():
    # CliRunner's console is 80 columns wide, like a default terminal
    for args in (("zoo",), ("profile", "models", "as_resnet_w32", "mobilenet_v2_x0.75", "--form", "eager", "--min-run-time", "0.01",
                            "--out", "/dev/null/x.csv")):
        res = runner.invoke(app, list(args))
        assert "…" not in res.output and "as_resnet_w32" in res.output, res.output
        assert max(len(line) for line in res.output.splitlines()) <= 80


def test_config_prints_every_key_with_its_default_and_choices():
    code, out = cli("config", "quick", "optim.lr=0.05")
    assert code == 0
    res = runner.invoke(app, ["config", "quick", "optim.lr=0.05"])
    lines = res.output.splitlines()
    lr = next(line for line in lines if line.strip().startswith("lr:"))
    assert "0.05" in lr and "default 0.1" in lr
    dataset = next(line for line in lines if line.strip().startswith("dataset:"))
    assert "one of synthetic, cifar10, cifar100, imagenet, npz, folder" in dataset
    plain = runner.invoke(app, ["config", "quick", "--plain"]).output
    assert load_config(__import__("yaml").safe_load(plain))["train"]["iterations"] == 1200
    code, out = cli("config", "quick", "optim.lrr=1")
    assert code == 2 and "did you mean optim.lr" in out
    assert "asl config" in runner.invoke(app, ["train", "--help"]).output.replace("\n", " ")


def test_plot_shifts_measures_and_compares_shift_travel(tmp_path, finished_run):
    import numpy as np

    hist = pd.read_csv(finished_run / "shifts.csv")
    first, last = (hist[hist["step"] == s].set_index(["layer", "channel"])[["alpha", "beta"]] for s in (0, 4))
    expected = np.sqrt(((last - first) ** 2).sum(axis=1)).mean()
    assert expected > 0
    code, out = cli("plot-shifts", finished_run, "--out", tmp_path / "one")
    travel = pd.read_csv(tmp_path / "one" / "shift_travel.csv")
    row = travel[(travel["layer"] == "all") & (travel["step"] == 4)].iloc[0]
    assert code == 0 and abs(row["mean_travel"] - expected) < 1e-4
    assert abs(row["spread"] - np.concatenate([last["alpha"], last["beta"]]).std()) < 1e-4
    assert set(travel["layer"]) == {"all", *hist["layer"]}

    second = tmp_path / "second"
    shutil.copytree(finished_run, second)
    code, out = cli("plot-shifts", finished_run, second, "--out", tmp_path / "cmp")
    assert code == 0 and "travel" in out, out
    cmp = pd.read_csv(tmp_path / "cmp" / "shift_travel.csv")
    assert set(cmp["run"]) == {finished_run.name, "second"} and (tmp_path / "cmp" / "shift_travel.png").exists()
    end = cmp[cmp["step"] == 4].iloc[0]
    # quick: lr 0.1, shifts at 0.01x, 50 warm-up steps under a cosine over the run's 4 steps
    budget = sum(0.001 * (t + 1) / 50 * 0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(4))
    walk = sum((0.001 * (t + 1) / 50 * 0.5 * (1 + np.cos(np.pi * t / 4))) ** 2 for t in range(4)) ** 0.5
    assert abs(end["mean_travel"] - expected) < 1e-4 and abs(end["shift_budget_px"] - budget) < 1e-8
    assert abs(end["shift_walk_px"] - walk) < 1e-8
    assert {"dataset", "encoding", "iterations", "schedule", "shift_lr_mult", "device_name"} <= set(cmp.columns)
