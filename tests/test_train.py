"""asl train / asl eval: recipes, run folders, exact resume, errors, distributed training."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from asl_cli.train import checkpoint as ckpt_io
from asl_cli.cli import app
from asl_cli.config import ConfigError, list_recipes, load_config
from asl_cli.data import TensorBatches, make_synthetic
from asl_cli.errors import Interrupted, NonFiniteLoss
from asl_cli.train import Callbacks, train
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=256", "data.test_size=128", "train.batch_size=32", "train.iterations=12", "train.eval_every=4",
        "train.ckpt_every=4", "train.log_every=2", "train.eval_batch_size=128"]


def tiny_cfg(tmp_path, *extra):
    return load_config("quick", TINY + [f"output.dir={tmp_path}"] + list(extra))


def weights(run_dir):
    return ckpt_io.load(run_dir, prefer="last")["model_state"]


def test_recipes_all_load():
    names = list_recipes()
    assert "quick" in names
    for n in names:
        cfg = load_config(n)
        assert cfg["model"]["name"]


def test_overrides_are_typed_and_checked():
    cfg = load_config("quick", ["optim.lr=0.05", "train.channels_last=true", "schedule.milestones=[10, 20]"])
    assert cfg["optim"]["lr"] == 0.05 and cfg["train"]["channels_last"] is True
    assert cfg["schedule"]["milestones"] == [10, 20]
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        load_config("quick", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.batch_size must be int"):
        load_config("quick", ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="did you mean quick"):
        load_config("quik")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("quick", ["optim.lr"])
    with pytest.raises(ConfigError, match="data.dataset must be one of"):
        load_config("quick", ["data.dataset=mnist"])
    with pytest.raises(ConfigError, match="model.name"):
        load_config("quick", ["model.name=resnet50"])


def test_broken_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("trian:\n  iterations: 3\n")
    with pytest.raises(ConfigError, match="did you mean train"):
        load_config(str(bad))


def test_augmentation_is_a_function_of_step_and_rank_slices_agree():
    x, y = make_synthetic(64, 0)
    one = TensorBatches(x, y, 16, (0.5,) * 3, (0.25,) * 3, True, 3, torch.device("cpu"))
    a0 = TensorBatches(x, y, 16, (0.5,) * 3, (0.25,) * 3, True, 3, torch.device("cpu"), rank=0, world=2)
    a1 = TensorBatches(x, y, 16, (0.5,) * 3, (0.25,) * 3, True, 3, torch.device("cpu"), rank=1, world=2)
    for k in (0, 5):
        xb, yb = one.batch(k)
        assert torch.equal(torch.cat([a0.batch(k)[0], a1.batch(k)[0]]), xb)
        assert torch.equal(torch.cat([a0.batch(k)[1], a1.batch(k)[1]]), yb)
        assert torch.equal(one.batch(k)[0], xb)


def test_augmentation_is_the_padded_crop_and_flip_it_draws():
    """Each image is the h x w window at its drawn offset of the zero-padded image, mirrored where
    drawn, then normalised: checked image by image against that definition."""
    x, y = make_synthetic(64, 0)
    tb = TensorBatches(x, y, 16, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), True, 3, torch.device("cpu"))
    for k in (0, 7):
        xb, yb = tb.batch(k)
        epoch, pos = divmod(k, tb.steps_per_epoch)
        idx = tb._permutation(epoch)[pos * 16:(pos + 1) * 16]
        g = torch.Generator().manual_seed(3 * 7_368_787 + k)
        off = torch.randint(0, 9, (16, 2), generator=g)
        flip = torch.rand(16, generator=g) < 0.5
        assert flip.any() and not flip.all()
        padded = torch.nn.functional.pad(x[idx].float(), (4, 4, 4, 4))
        for i in range(16):
            r, c = off[i].tolist()
            want = padded[i, :, r:r + 32, c:c + 32]
            want = (want.flip(-1) if flip[i] else want).unsqueeze(0).sub(tb.mean).div(tb.std)[0]
            assert torch.equal(xb[i], want), (k, i)
        assert torch.equal(yb, y[idx]) and xb.is_contiguous() and xb.dtype == torch.float32


def test_run_folder_contents(tmp_path):
    run = tmp_path / "run"
    out = train(tiny_cfg(run))
    assert (run / "config.yaml").exists()
    m = pd.read_csv(run / "metrics.csv")
    assert list(m.columns) == ["step", "epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds", "images_per_s"]
    assert m["step"].tolist() == [4, 8, 12]
    s = pd.read_csv(run / "shifts.csv")
    assert set(s["step"]) == {0, 4, 8, 12} and set(s.columns) == {"step", "layer", "channel", "alpha", "beta"}
    ck = ckpt_io.load(run, prefer="last")
    assert ck["step"] == 12 and ck["preprocessing"]["kind"] == "tensor" and ck["shifts"]
    assert out["best_top1"] == pytest.approx(m["test_top1"].max())


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    train(tiny_cfg(full))

    cut = tmp_path / "cut"

    def stop_at_6(step, total, stats):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as info:
        train(tiny_cfg(cut), callbacks=Callbacks(on_step=stop_at_6))
    assert info.value.step == 7 or info.value.step == 6
    assert ckpt_io.load(cut, prefer="last")["step"] == info.value.step
    train(load_config(str(cut / "config.yaml")), resume=cut)

    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cols = ["step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5"]
    pd.testing.assert_frame_equal(pd.read_csv(full / "metrics.csv")[cols], pd.read_csv(cut / "metrics.csv")[cols])
    sf, sc = pd.read_csv(full / "shifts.csv"), pd.read_csv(cut / "shifts.csv")
    # the interrupted run also recorded the shifts of its extra (interrupt) checkpoint
    assert set(sc["step"]) == set(sf["step"]) | {info.value.step}
    pd.testing.assert_frame_equal(sf, sc[sc["step"].isin(sf["step"])].reset_index(drop=True))


def test_a_schedulers_signals_together_still_checkpoint(tmp_path):
    """Slurm preempts with USR2 then SIGTERM at once: the run still stops at a step with its
    checkpoint (the first signal recorded), where a second Ctrl-C would stop it at once."""
    run = tmp_path / "run"

    def preempt_at_6(step, total, stats):
        if step == 6:
            os.kill(os.getpid(), signal.SIGUSR2)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train(tiny_cfg(run), callbacks=Callbacks(on_step=preempt_at_6), stop_signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2))
    assert info.value.signum == signal.SIGUSR2 and info.value.step in (6, 7)
    assert ckpt_io.load(run, prefer="last")["step"] == info.value.step

    def ctrl_c_twice(step, total, stats):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "twice"), callbacks=Callbacks(on_step=ctrl_c_twice))


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.iterations=4"))
    last = run / "checkpoints" / "last.pt"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated or corrupt"):
        ckpt_io.load(broken)
    other = tmp_path / "other.pt"
    torch.save({"hello": 1}, other)
    with pytest.raises(ckpt_io.CheckpointError, match="not an asl checkpoint"):
        ckpt_io.load(other)
    with pytest.raises(ckpt_io.CheckpointError, match="does not fit"):
        train(tiny_cfg(tmp_path / "ft", "model.name=asnet20_16x3"), init_from=run)


def test_init_from_fine_tunes(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.iterations=4"))
    out = train(tiny_cfg(tmp_path / "ft", "train.iterations=4"), init_from=run / "checkpoints" / "last.pt")
    assert out["steps"] == 4


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as info:
        train(tiny_cfg(run, "optim.lr=1.0e+30", "schedule.warmup=0", "train.iterations=50", "train.ckpt_every=1"))
    good = info.value.last_good
    if good is not None:
        ck = ckpt_io.load(run, prefer="last")
        assert ck["step"] == good
        assert all(torch.isfinite(v).all() for v in ck["model_state"].values() if v.is_floating_point())


def test_npz_dataset(tmp_path):
    x, y = make_synthetic(96, 1)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x[:64].permute(0, 2, 3, 1).numpy(), y_train=y[:64].numpy(),
             x_test=x[64:].permute(0, 2, 3, 1).numpy(), y_test=y[64:].numpy())
    out = train(load_config("quick", ["data.dataset=npz", f"data.path={path}", "train.iterations=2", "train.batch_size=16",
                                      f"output.dir={tmp_path / 'run'}"]))
    assert out["steps"] == 2
    np.savez(path, x_train=x[:4].numpy())
    runner = CliRunner()
    res = runner.invoke(app, ["train", "quick", "data.dataset=npz", f"data.path={path}", f"output.dir={tmp_path / 'r2'}"])
    assert res.exit_code == 1 and "lacks" in res.output


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "nosuchrecipe"])
    assert res.exit_code == 2 and "unknown recipe" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "quick", "optim.lrr=1"])
    assert res.exit_code == 2 and "did you mean" in res.output
    res = runner.invoke(app, ["train", "quick", "data.dataset=cifar10", f"data.root={tmp_path}", "data.download=false"])
    assert res.exit_code == 1 and "cifar-10-batches-py" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_cli_train_then_eval(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "quick", *TINY, "train.iterations=4", f"output.dir={run}"])
    assert res.exit_code == 0, res.output
    assert "training summary" in res.output
    csv = tmp_path / "eval.csv"
    res = runner.invoke(app, ["eval", str(run), "--csv", str(csv)])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(csv, dtype={"commit": str}).iloc[-1]
    assert row["model"] == "asnet20_16x1"
    assert row["params"] == 35386 and 0 <= row["top1"] <= 100
    assert row["cpu_ms_batch1"] > 0 and isinstance(row["commit"], str) and row["commit"]


@pytest.mark.slow
def test_distributed_gloo_matches_single_process(tmp_path):
    common = TINY + ["train.iterations=6", "train.eval_every=6", "train.ckpt_every=6"]
    single = tmp_path / "single"
    train(load_config("quick", common + [f"output.dir={single}"]))
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "-m", "asl_cli", "train", "quick",
           *common, f"output.dir={ddp}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = weights(single), weights(ddp)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3, msg=k)
    ma, mb = pd.read_csv(single / "metrics.csv"), pd.read_csv(ddp / "metrics.csv")
    assert ma["test_top1"].tolist() == pytest.approx(mb["test_top1"].tolist(), abs=1.0)
    assert ma["train_loss"].tolist() == pytest.approx(mb["train_loss"].tolist(), rel=1e-3)


def test_several_model_args_overrides_add_up():
    cfg = load_config("quick", ["model.args.shift_mode=GS", "model.args.shift_seed=3"])
    assert cfg["model"]["args"] == {"shift_mode": "GS", "shift_seed": 3}


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_channels_last(tmp_path, amp):
    out = train(tiny_cfg(tmp_path / amp, "train.device=cuda", f"train.amp={amp}", "train.channels_last=true", "train.iterations=4"))
    assert out["steps"] == 4 and out["last"]["test_top1"] >= 0


def test_recipe_base_inheritance(tmp_path):
    (tmp_path / "fam.yaml").write_text("data: {dataset: synthetic, train_size: 300}\noptim: {lr: 0.3, momentum: 0.5}\nschedule: {milestones: [5, 9]}\n")
    (tmp_path / "child.yaml").write_text("base: fam\noptim: {lr: 0.2}\nschedule: {milestones: [7]}\ntrain: {iterations: 10}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg["optim"]["lr"] == 0.2 and cfg["optim"]["momentum"] == 0.5  # own keys win, the rest is inherited
    assert cfg["schedule"]["milestones"] == [7] and cfg["data"]["train_size"] == 300 and cfg["name"] == "child"
    (tmp_path / "grand.yaml").write_text("base: child.yaml\n")
    assert load_config(str(tmp_path / "grand.yaml"))["optim"]["lr"] == 0.2
    # a shipped per-model recipe is its family's base plus the model
    assert load_config("asnet20_46x1")["schedule"]["milestones"] == [32000, 48000]
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: no_such_recipe\n")
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.slow
def test_the_default_cpu_step_is_compiled_channels_last_fused_and_trains_as_the_plain_eager_step(tmp_path, monkeypatch):
    import asl_cli
    from asl_cli.train import model_setup

    monkeypatch.setattr(model_setup, "COMPILE_MIN_STEPS", 1)  # a short run, so the default compiles here
    monkeypatch.setenv("ASL_CACHE_DIR", str(tmp_path))  # the kernels go to $ASL_CACHE_DIR/inductor
    monkeypatch.setattr(asl_cli, "USER_INDUCTOR_CACHE", None)  # the user chose no kernel cache of their own
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torch-default")  # as torch's compiler writes it on import
    runs = {}
    for setting in ("auto", "false"):
        losses, notes = [], []
        cb = Callbacks(on_step=lambda step, total, st: losses.append(st["loss"]), on_note=notes.append)
        summary = train(tiny_cfg(tmp_path / setting, f"train.compile={setting}", f"train.channels_last={setting}",
                                 f"train.fuse_bn_relu={setting}", "train.log_every=1", "train.iterations=8"), callbacks=cb)
        runs[setting] = (summary, losses, notes)
    (auto, auto_losses, auto_notes), (eager, eager_losses, _) = runs["auto"], runs["false"]
    assert auto["compiled"] and not eager["compiled"]
    assert auto["channels_last"] and not eager["channels_last"]
    assert auto["fused_bn_relu"] > 0 and eager["fused_bn_relu"] == 0
    assert any("compiling the training step" in n for n in auto_notes)
    assert sum("first (compiled) step took" in n for n in auto_notes) == 1  # once, for the step that compiles
    assert len(auto_losses) == 8 and len(set(eager_losses)) == 8  # the weights move from step to step
    np.testing.assert_allclose(auto_losses, eager_losses, rtol=2e-3)
    assert list((tmp_path / "inductor").iterdir())  # compiled kernels kept for the next run


def test_without_a_cxx_compiler_auto_trains_eagerly_and_says_so(tmp_path, monkeypatch):
    from asl_cli.train import model_setup

    monkeypatch.setattr(model_setup, "COMPILE_MIN_STEPS", 1)
    monkeypatch.setattr(model_setup, "cxx_compiler", lambda: None)
    notes = []
    summary = train(tiny_cfg(tmp_path, "train.iterations=2"), callbacks=Callbacks(on_note=notes.append))
    assert not summary["compiled"] and any("no C++ compiler" in n for n in notes)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        train(tiny_cfg(tmp_path / "b", "train.compile=true"))


def test_short_runs_and_gpus_keep_the_eager_step():
    from asl_cli.train.model_setup import COMPILE_MIN_STEPS, compile_choice

    cpu = torch.device("cpu")
    assert compile_choice("auto", cpu, 1, COMPILE_MIN_STEPS - 1) == (False, "")
    assert compile_choice("auto", torch.device("cuda"), 1, 10**6) == (False, "")
    assert compile_choice(False, cpu, 1, 10**6) == (False, "")


def test_cpu_runs_pad_malloc_unless_the_environment_or_the_recipe_says_otherwise(tmp_path, monkeypatch):
    from asl_cli import allocator

    calls = []
    monkeypatch.setattr(allocator, "pad_malloc", lambda mib: calls.append(mib) or f"padded {mib}")
    for k in allocator.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    assert allocator.configure("auto", "cpu") == "padded 1024" and calls == [1024]
    assert allocator.configure("auto", "cuda") == "default" and calls == [1024]
    assert allocator.configure(0, "cpu") == "padded 0" and allocator.configure(16, "cuda") == "padded 16"
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    assert allocator.configure("auto", "cpu") == "environment MALLOC_TOP_PAD_=1048576" and calls == [1024, 0, 16]
    for bad in (-1, 2048, True, "lots"):
        with pytest.raises(ValueError, match="malloc_pad_mib"):
            allocator.configure(bad, "cpu")
        with pytest.raises(ConfigError, match="malloc_pad_mib"):
            tiny_cfg(tmp_path, f"train.malloc_pad_mib={str(bad).lower()}")
    summary = train(tiny_cfg(tmp_path, "train.iterations=1", "train.malloc_pad_mib=8"))
    assert summary["malloc"] == "padded 8"


def test_pad_malloc_reports_what_glibc_accepted():
    from asl_cli.allocator import pad_malloc

    assert pad_malloc(0) == "default"
    assert pad_malloc(64) in ("glibc trim_threshold=top_pad=mmap_threshold=64MiB", "default (mallopt unavailable)")
    with pytest.raises(ValueError, match="at most 2047"):
        pad_malloc(4096)


def test_the_shift_rate_follows_the_square_root_rule(tmp_path):
    from asl_cli.train.optim import shift_lr_mult

    cfg = tiny_cfg(tmp_path, "optim.shift_lr_reference_iterations=48", "train.iterations=12")
    assert abs(shift_lr_mult(cfg) - 0.01 * 2) < 1e-12  # sqrt(48 / 12)
    assert shift_lr_mult(tiny_cfg(tmp_path)) == 0.01  # unset: the recipe's multiplier as it is
    notes = []
    summary = train(cfg, callbacks=Callbacks(on_start=lambda info: notes.append(info["shift_lr_mult"])))
    assert notes == [0.02] and summary["steps"] == 12
    opt_state = ckpt_io.load(tmp_path, prefer="last")["optimizer"]
    (shift_group,) = [g for g in opt_state["param_groups"] if g.get("name") == "shift"]
    assert abs(shift_group["initial_lr"] - 0.1 * 0.02) < 1e-12
    with pytest.raises(ConfigError, match="give train.iterations"):
        load_config("quick", ["optim.shift_lr_reference_iterations=100", "train.iterations=null", "train.epochs=1"])
