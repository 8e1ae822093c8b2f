"""The image-folder dataset source, the sweep (parallel workers, reuse, statistics) and its stats."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from asl_cli.data import folder as imf
from asl_cli.cli import app
from asl_cli.config import ConfigError, load_config
from asl_cli.data import DataError
from asl_cli.experiments.sweeps.sweep import Axis
from asl_cli.experiments.sweeps.stats import summarize, t_ppf, t_sf2, welch, welch_from_summaries
from conftest import HANG_GUARD_S

runner = CliRunner()
TINY = ["data.train_size=128", "data.test_size=64", "train.batch_size=32", "train.iterations=4", "train.eval_every=4",
        "train.ckpt_every=2", "train.eval_batch_size=64", "train.log_every=2"]


# ---- statistics (reference values from Student-t tables / SciPy) ----
@pytest.mark.parametrize("df,q", [(1, 12.7062047), (2, 4.3026527), (10, 2.2281389), (1000, 1.9623391)])
def test_t_quantile(df, q):
    assert t_ppf(0.975, df) == pytest.approx(q, rel=1e-6)


def test_t_tail_and_welch():
    assert t_sf2(2.0, 5) == pytest.approx(0.1019395, rel=1e-5)
    diff, p = welch([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert diff == -2.5 and p == pytest.approx(0.0349388, rel=1e-4)
    assert math.isnan(welch([1.0], [2.0, 3.0])[1])


def test_welch_from_summaries_equals_welch_on_the_values():
    a, b = [79.1, 80.2, 78.9], [77.5, 76.6, 77.2, 76.9]
    assert welch_from_summaries(summarize(a), summarize(b)) == pytest.approx(welch(a, b), rel=1e-12)
    assert math.isnan(welch_from_summaries(summarize([1.0]), summarize(b))[1])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0])
    assert s.mean == 2 and s.std == 1 and s.ci_high - 2 == pytest.approx(4.3026527 / math.sqrt(3), rel=1e-6)
    one = summarize([5.0])  # one value: no spread, no interval
    assert one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)


# ---- image folders ----
def make_folder(root, n=3, size=8, classes=("cat", "dog"), mode="RGB", test="test"):
    rng = np.random.default_rng(0)
    for split in ("train", test):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).convert(mode).save(root / split / c / f"{i}.png")
    return root


def test_folder_reads_and_caches(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds")
    d = imf.image_folder(str(root), cache=str(tmp_path / "cache"))
    assert d.x_train.shape == (6, 3, 8, 8) and d.x_train.dtype == torch.uint8
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.num_classes == 2
    assert d.name == "folder:ds" and d.encoding == "PNG files"
    first = np.array(Image.open(root / "train" / "cat" / "0.png"))
    assert torch.equal(d.x_train[0], torch.from_numpy(first).permute(2, 0, 1))
    assert len(list((tmp_path / "cache").glob("folder-ds-*.pt"))) == 1

    def no_decode(path):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imf, "_decode", no_decode)
    again = imf.image_folder(str(root), cache=str(tmp_path / "cache"))
    assert torch.equal(again.x_test, d.x_test)


def test_folder_cache_is_invalidated_by_a_changed_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    imf.image_folder(str(root), cache=str(tmp_path / "cache"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "dog" / "9.png")
    d = imf.image_folder(str(root), cache=str(tmp_path / "cache"))
    assert len(d.x_test) == 7


def test_folder_greyscale_and_val_split(tmp_path):
    d = imf.image_folder(str(make_folder(tmp_path / "g", mode="L", test="val")), cache="none")
    assert d.x_train.shape == (6, 3, 8, 8) and torch.equal(d.x_train[:, 0], d.x_train[:, 1])


@pytest.mark.parametrize("problem", ["missing", "no_test", "class_mismatch", "sizes", "sixteen_bit", "corrupt"])
def test_folder_errors(tmp_path, problem):
    root = tmp_path / "ds"
    if problem != "missing":
        make_folder(root)
    if problem == "no_test":
        import shutil

        shutil.rmtree(root / "test")
    elif problem == "class_mismatch":
        (root / "test" / "bird").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "bird" / "0.png")
    elif problem == "sizes":
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "cat" / "big.png")
    elif problem == "sixteen_bit":
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "train" / "cat" / "deep.png")
    elif problem == "corrupt":
        (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError):
        imf.image_folder(str(root), cache="none")


def test_folder_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        load_config("quick", ["data.dataset=folder"])


def test_train_on_a_folder(tmp_path):
    root = make_folder(tmp_path / "ds", n=20)
    res = runner.invoke(app, ["train", "quick", f"data.path={root}", "data.dataset=folder", f"data.cache={tmp_path / 'c'}",
                              "train.batch_size=8", "train.iterations=3", "train.eval_every=3", f"output.dir={tmp_path / 'run'}"])
    assert res.exit_code == 0, res.output
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["preprocessing"]["dataset"] == "folder:ds" and ck["preprocessing"]["encoding"] == "PNG files"
    assert ck["model_args"]["num_classes"] == 2


# ---- sweeps ----
def test_axis_parsing():
    assert Axis.parse("optim.lr=0.05, 0.1") == Axis("optim.lr", ["0.05", "0.1"])
    for bad in ("optim.lr", "optim.lr=", "optim.lr=1,1"):
        with pytest.raises(ConfigError):
            Axis.parse(bad)


def test_sweep_parallel_workers_reuse_and_statistics(tmp_path):
    csv = tmp_path / "s.csv"
    args = ["sweep", "quick", *TINY, "--axis", "model.args.spatial=asl,dw3", "--seeds", "2", "--jobs", "2",
            "--root", str(tmp_path / "runs"), "--csv", str(csv)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(csv)
    assert df["cell"].tolist() == ["asl", "dw3"] and (df["seeds"] == 2).all()
    for col in ("top1_mean", "top1_std", "top1_ci95_low", "top1_ci95_high", "diff_vs_baseline", "p_welch", "paper_top1",
                "schedule", "dataset", "encoding", "run_dirs"):
        assert col in df.columns, col
    assert (df["top1_ci95_low"] <= df["top1_mean"]).all() and (df["top1_mean"] <= df["top1_ci95_high"]).all()
    assert pd.isna(df.loc[0, "diff_vs_baseline"]) and df.loc[0, "baseline"] == "asl"  # no test against itself
    assert not pd.isna(df.loc[1, "p_welch"]) and df.loc[1, "params"] != df.loc[0, "params"]
    for _, row in df.iterrows():  # each seed's top-1, so that later comparisons need no run folders
        seeds = [float(v) for v in row["top1_runs"].split(";")]
        assert len(seeds) == 2 and sum(seeds) / 2 == pytest.approx(row["top1_mean"], abs=0.01)
    assert df.loc[0, "dataset"] == "synthetic" and df.loc[0, "paper_top1"] == 94.5
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "s.svg").exists()
    assert "dw3 seed 1: running" in res.output and "dw3 seed 1: done" in res.output  # the log-file view
    for run in (tmp_path / "runs").iterdir():
        assert (run / "progress.json").exists() and (run / "checkpoints" / "last.pt").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reused") == 4, again.output
    pd.testing.assert_frame_equal(pd.read_csv(csv)[["cell", "top1_mean"]], df[["cell", "top1_mean"]])


def test_sweep_reports_a_failed_worker(tmp_path):
    res = runner.invoke(app, ["sweep", "quick", *TINY, "--axis", "optim.lr=0.1,1e30", "--jobs", "2",
                              "--root", str(tmp_path / "runs"), "--csv", str(tmp_path / "s.csv")])
    assert res.exit_code == 1 and "1e30 seed 0 failed" in res.output.replace("\n", " ")
    df = pd.read_csv(tmp_path / "s.csv")
    assert df["seeds"].tolist() == [1, 0]


@pytest.mark.parametrize("args,message", [
    (["ablate", "quick", "--variant", "gs,GS"], "twice"),
    (["ablate", "quick", "model.args.spatial=dw3"], "no active shift layers"),
    (["sweep", "quick", "--axis", "optim.lr=0.1", "--axis", "optim.lr=0.2"], "twice"),
    (["sweep", "quick", "--axis", "optim.lr=0.1", "--baseline", "0.3"], "not a cell"),
    (["sweep", "quick", "--axis", "optim.nope=1"], "unknown key"),
])
def test_sweep_and_ablate_refuse_bad_requests(args, message, tmp_path):
    res = runner.invoke(app, args + ["--root", str(tmp_path / "r")])
    assert res.exit_code == 2 and message in res.output.replace("\n", " "), res.output


def test_encode_folder_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = make_folder(tmp_path / "png", n=2)
    script = Path(__file__).resolve().parents[1] / "scripts" / "encode_folder.py"
    out = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "jpg"), "--quality", "80"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    d = imf.image_folder(str(tmp_path / "jpg"), cache="none")
    assert d.x_train.shape == (4, 3, 8, 8) and d.encoding == "JPEG files" and d.y_test.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("command, jobs", [("sweep", "1"), ("sweep", "2"), ("ablate", "2")])
def test_a_sweep_whose_every_run_failed_ends_with_one_message(tmp_path, command, jobs):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ([command, "quick"] + (["--axis", "model.args.shift_mode=SR,TR"] if command == "sweep" else ["--variant", "SR,TR"])
            + [*TINY, "data.dataset=folder", f"data.path={empty}", "--jobs", jobs, "--root", str(tmp_path / "r"),
               "--csv", str(tmp_path / "s.csv")])
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    flat = " ".join(res.output.split())
    assert "no train subfolder" in flat  # why the runs failed
    if jobs != "1":  # in worker processes every run is tried; in-process the first error ends the sweep
        assert "every run failed" in flat
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    assert not (tmp_path / "s.csv").exists()


def test_help_shows_the_cluster_extra():
    text = runner.invoke(app, ["sweep", "--help"], terminal_width=250).output
    assert "asl-cli[cluster]" in " ".join(text.split())
