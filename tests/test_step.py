"""The training step: statistics kept on the device, the deferred non-finite check, CUDA graphs."""
import math

import pytest
import torch

from asl_cli.train import checkpoint as ckpt_io
from asl_cli.config import DEFAULTS, ConfigError, load_config
from asl_cli.errors import NonFiniteLoss, TrainingError
from asl_cli.train import train
from asl_cli.train.optim import build_optimizer
from asl_cli.experiments.benchmarks.train_speed import make_step
from asl_cli.train.step import TrainStep, host_lrs, lr_to_device
from asl_cli.zoo import create_model

TINY = ["data.train_size=256", "data.test_size=128", "train.batch_size=32", "train.iterations=12", "train.eval_every=4",
        "train.ckpt_every=4", "train.log_every=2", "train.eval_batch_size=128"]


def _step(device="cpu", graph=False):
    torch.manual_seed(0)
    model = create_model("asnet20_16x1").to(device)
    opt = build_optimizer(model, DEFAULTS["optim"], torch.device(device))
    scaler = torch.amp.GradScaler(device, enabled=False)
    return model, opt, TrainStep(model, opt, scaler, torch.device(device), graph=graph)


def test_statistics_accumulate_on_device_until_read():
    model, opt, step = _step()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        step(x, y)
    st = step.take_stats()
    assert st.count == 24 and 0 <= st.correct <= 24 and st.first_bad_step is None
    assert math.isfinite(st.loss_sum) and st.loss_sum > 0
    assert step.take_stats().count == 0  # reading resets the sums
    assert int(step.step_t) == 3


def test_first_non_finite_step_is_recorded():
    model, opt, step = _step()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    step(x, y)
    step(x * float("nan"), y)
    step(x, y)
    st = step.take_stats()
    assert st.first_bad_step == 1
    assert st.count == 24  # the bad step's loss is left out of the sum, which stays finite
    assert math.isfinite(st.loss_sum)


def test_lr_tensors_round_trip_as_floats():
    model, opt, _ = _step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    lr_to_device(opt, torch.device("cpu"))
    sched.step()
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    sd = host_lrs(opt.state_dict())
    assert all(isinstance(g["lr"], float) for g in sd["param_groups"])
    assert sd["param_groups"][-1]["lr"] == pytest.approx(0.05)
    assert all(isinstance(v, float) for v in host_lrs(sched.state_dict())["_last_lr"])


def test_divergence_never_saves_non_finite_weights(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as info:
        train(load_config("quick", TINY + [f"output.dir={run}", "optim.lr=1000", "schedule.warmup=0",
                                           "train.ckpt_every=1", "train.iterations=50"]))
    good = info.value.last_good
    assert good is not None and "non-finite" in str(info.value)
    ck = ckpt_io.load(run, prefer="last")
    assert ck["step"] == good
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values() if v.is_floating_point())


def test_cuda_graph_setting(tmp_path):
    with pytest.raises(TrainingError, match="CUDA"):
        train(load_config("quick", TINY + [f"output.dir={tmp_path / 'a'}", "train.device=cpu", "train.cuda_graph=true"]))
    out = train(load_config("quick", TINY + [f"output.dir={tmp_path / 'b'}", "train.device=cpu", "train.iterations=2"]))
    assert out["cuda_graph"] is False  # auto: off on the CPU
    with pytest.raises(ConfigError):
        load_config("quick", ["train.cuda_graph=sometimes"])


def test_train_speed_step_runs_the_training_step():
    fn = make_step("asnet20_16x1", "asl", 16, torch.device("cpu"))
    fn()
    fn()
    with pytest.raises(ValueError, match="mode"):
        make_step("asnet20_16x1", "asl", 16, torch.device("cpu"), mode="fast")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_step_matches_eager():
    """The captured step gives the weights of the eager step (same kernels, same order)."""
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    results = []
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for graph in (False, True):
            model, opt, step = _step("cuda", graph)
            for k in range(8):
                step(x + 0.01 * k, y)
            torch.cuda.synchronize()
            results.append((model.state_dict(), step.take_stats()))
    finally:
        torch.backends.cudnn.deterministic = old
    (a, sa), (b, sb) = results
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-3)
    assert sa.count == sb.count == 128
    assert sb.loss_sum == pytest.approx(sa.loss_sum, rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_training_run(tmp_path):
    run = tmp_path / "g"
    out = train(load_config("quick", TINY + [f"output.dir={run}", "train.device=cuda"]))
    assert out["cuda_graph"] is True and out["last"]["test_top1"] >= 0
    ck = ckpt_io.load(run, prefer="last")
    assert isinstance(ck["optimizer"]["param_groups"][0]["lr"], float)
