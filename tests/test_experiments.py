"""asl ablate, asl profile and asl plot-shifts: files written, documented columns, sane numbers."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from asl_cli.cli import app
from asl_cli.experiments.bench import provenance

PROV = list(provenance("cpu", 1))
TINY = ["data.train_size=256", "data.test_size=128", "train.batch_size=32", "train.iterations=6", "train.eval_every=3",
        "train.ckpt_every=3", "train.eval_batch_size=128"]
runner = CliRunner()


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_ablate_all_variants_and_reuse(tmp_path):
    csv = tmp_path / "ablate.csv"
    out = invoke("ablate", "quick", *TINY, "--variant", "all", "--seeds", "2", "--root", tmp_path / "runs", "--csv", csv)
    assert "training" in out
    df = pd.read_csv(csv)
    assert df["variant"].tolist() == ["GS", "SI", "SR", "TR"]
    for col in ["shifting_domain", "initialisation", "learned", "top1_mean", "top1_std", "top5_mean", "top5_std", "params", "run_dirs", *PROV]:
        assert col in df.columns, col
    assert df["learned"].tolist() == [False, False, False, True]
    assert (df["seeds"] == 2).all() and df["params"].nunique() == 1
    assert len(list((tmp_path / "runs").iterdir())) == 8
    # a second call trains nothing and reports the same numbers
    out2 = invoke("ablate", "quick", *TINY, "--variant", "all", "--seeds", "2", "--root", tmp_path / "runs", "--csv", csv)
    assert "reused" in out2 and "training in" not in out2
    pd.testing.assert_frame_equal(pd.read_csv(csv)[["variant", "top1_mean", "top5_mean"]], df[["variant", "top1_mean", "top5_mean"]])


def test_ablate_bad_variant():
    res = runner.invoke(app, ["ablate", "quick", "--variant", "XY"])
    assert res.exit_code == 2 and "GS, SI, SR, TR" in res.output


def test_profile_layers_writes_table_and_figure(tmp_path):
    csv = tmp_path / "layers.csv"
    invoke("profile", "layers", "--shape", "1x8x32x32", "--min-run-time", "0.05", "--out", csv)
    df = pd.read_csv(csv)
    assert df["layer"].tolist() == ["dw3", "pw", "bn", "relu", "add", "asl"]
    for col in ["ms", "mflops", "ms_per_mflop", "paper_ms", *PROV]:
        assert col in df.columns
    by = df.set_index("layer")
    assert by.loc["pw", "mflops"] == pytest.approx(8 * 8 * 32 * 32 / 1e6, rel=1e-3)
    assert by.loc["dw3", "mflops"] == pytest.approx(9 * 8 * 32 * 32 / 1e6, rel=1e-3)
    assert by.loc["asl", "mflops"] == pytest.approx(4 * 8 * 32 * 32 / 1e6, rel=1e-3)
    assert (tmp_path / "layers_time_per_mflop.png").stat().st_size > 1000
    assert (tmp_path / "layers_time_per_mflop.svg").exists()
    invoke("profile", "layers", "asl", "relu", "--shape", "1x8x16x16", "--backward", "--min-run-time", "0.05", "--out", tmp_path / "b.csv")


def test_profile_models_and_pairs(tmp_path):
    csv = tmp_path / "models.csv"
    out = invoke("profile", "models", "as_resnet_w32", "mobilenet_v2_x0.5", "--min-run-time", "0.05", "--out", csv)
    assert "as_resnet_w32 / mobilenet_v2_x0.5" in out
    df = pd.read_csv(csv)
    for col in ["model", "form", "fastest", "params", "macs", "cpu_ms_batch1", "cpu_gmacs_per_s", "cpu_blas_gmacs_per_s",
                "top1", "paper_top1", "paper_cpu_ms", "malloc", *PROV]:
        assert col in df.columns
    assert set(df["malloc"]) <= {"glibc trim_threshold=top_pad=mmap_threshold=1024MiB", "default (mallopt unavailable)"}
    assert sorted(set(df["form"])) == ["eager", "frozen", "frozen-inference", "inference"]
    assert df.groupby("model")["fastest"].sum().tolist() == [1, 1]  # one fastest form per model
    assert "fastest:" in out and "eager:" in out
    assert (tmp_path / "models_accuracy_vs_latency.png").exists()


def test_profile_op_cpu(tmp_path):
    csv = tmp_path / "op.csv"
    csv.write_text("commit,op\n12363e220724,old\n")  # an earlier row whose hash looks like a number
    out = invoke("profile", "op", "--min-run-time", "0.05", "--shape", "4x16x8x8", "--shape", "1x8x12x10", "--out", csv)
    flat = " ".join(out.split())
    assert "active shift against a copy" in flat and "forward <= 1.5x a copy" in flat
    df = pd.read_csv(csv, dtype={"commit": str})
    assert df["commit"].iloc[0] == "12363e220724"
    df = df.iloc[1:]
    assert set(df["op"]) == {"copy", "clone", "relu", "dw3", "grid_sample_asl", "asl", "shift_conv1x1"}
    ops = df[df["op"] == "asl"]  # two shapes x two memory formats x two strides x (fwd, fwd+bwd)
    assert len(ops) == 16 and set(ops["memory_format"]) == {"nchw", "channels_last"} and set(ops["stride"].astype(int)) == {1, 2}
    for col in ["fwd_vs_copy", "fwdbwd_vs_copy", "fwd_vs_relu", "fwdbwd_vs_dw3", "grid_sample_speedup_fwd", "fused_vs_conv1x1",
                "fused_vs_shift_then_conv", *PROV]:
        assert col in df.columns
    bad = runner.invoke(app, ["profile", "op", "--shape", "4x16"])
    assert bad.exit_code == 2 and "--shape must look like" in bad.output
    fused = df[df["op"] == "shift_conv1x1"]
    assert len(fused) == 9 and (fused["fused_vs_conv1x1"].astype(float) > 0).all() and "target: fused within" in out


def test_profile_train_speed_writes_every_block_with_its_allocator_and_page_faults(tmp_path):
    csv = tmp_path / "speed.csv"
    out = invoke("profile", "train-speed", "asnet20_16x1", "--batch", "4", "--malloc-pad", "0", "--rounds", "2",
                 "--min-run-time", "0.05", "--out", csv)
    flat = " ".join(out.split())  # the console wraps long lines
    assert "asl fastest (eager, " in flat and "dw3_bn eager (eager, nchw)" in flat
    df = pd.read_csv(csv)
    # on the CPU both layouts and both BatchNorm-ReLUs by default: NCHW with ATen's (plain PyTorch)
    # to channels_last with the fused operator (asl train's)
    assert df["spatial"].tolist() == ["asl", "dw3_bn", "dw3"] * 4 and set(df["malloc"]) == {"default"}
    assert df["channels_last"].tolist() == [False] * 6 + [True] * 6
    assert df["fused_bn_relu"].tolist() == ([False] * 3 + [True] * 3) * 2
    assert (df["page_faults_per_step"] >= 0).all() and (df["images_per_s"] > 0).all() and (df["rounds"] == 2).all()
    assert all(len(str(v).split(";")) == 2 for v in df["ms_per_step_rounds"])
    assert (df["fraction_of_matmul_peak"] > 0).all() and df["speedup_of_first"].iloc[0] == 1.0


def test_profile_errors():
    res = runner.invoke(app, ["profile"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["profile", "layers", "conv7"])
    assert res.exit_code == 2 and "dw3" in res.output
    res = runner.invoke(app, ["profile", "models", "as_resnet_w33"])
    assert res.exit_code == 2 and "did you mean" in res.output
    res = runner.invoke(app, ["profile", "train-speed", "asnet20_16x1", "--mode", "warp"])
    assert res.exit_code == 2 and "compile+graph" in res.output
    # --help lists every choice
    for sub, words in (("layers", ["dw3", "pw", "bn", "relu", "add", "asl", "all"]), ("train-speed", ["eager", "graph", "bf16"])):
        text = runner.invoke(app, ["profile", sub, "--help"], terminal_width=200).output
        assert all(w in text for w in words), text


def test_plot_shifts_from_run(tmp_path):
    run = tmp_path / "run"
    invoke("train", "quick", *TINY, f"output.dir={run}")
    out_dir = tmp_path / "fig"
    invoke("plot-shifts", run, "--out", out_dir)
    for f in ["shifts.png", "shifts.svg", "shift_movement.png", "shift_movement.svg", "shift_stats.csv"]:
        assert (out_dir / f).exists(), f
    st = pd.read_csv(out_dir / "shift_stats.csv")
    assert list(st.columns) == ["model", "step", "layer", "channels", "mean_abs_shift", "max_abs_shift", "share_beyond_1px", "mean_alpha", "mean_beta"]
    assert len(st) == 9 and (st["share_beyond_1px"].between(0, 1)).all()


def test_plot_shifts_draws_a_run_beside_earlier_runs_from_their_csv(tmp_path):
    run = tmp_path / "run"
    invoke("train", "quick", *TINY, f"output.dir={run}")
    earlier = Path(__file__).resolve().parents[1] / "results" / "shift_travel_cifar10" / "shift_travel.csv"
    invoke("plot-shifts", run, "--beside", earlier, "--out", tmp_path / "cmp")
    table = pd.read_csv(tmp_path / "cmp" / "shift_travel.csv", dtype={"commit": str})
    old = pd.read_csv(earlier, dtype={"commit": str})
    assert table["run"].iloc[-1] == "run" and set(old["run"]) < set(table["run"])
    pd.testing.assert_frame_equal(table.iloc[: len(old)][old.columns].reset_index(drop=True), old)  # kept as they were
    assert (tmp_path / "cmp" / "shift_travel.png").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["plot-shifts", str(run), "--beside", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "not a shift_travel.csv" in res.output
    res = runner.invoke(app, ["plot-shifts", "--beside", str(earlier)])
    assert res.exit_code == 2


def test_plot_shifts_needs_asl_layers(tmp_path):
    run = tmp_path / "run"
    invoke("train", "quick", *TINY, "model.args.spatial=dw3", f"output.dir={run}")
    res = runner.invoke(app, ["plot-shifts", str(run), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no active shift layers" in res.output
