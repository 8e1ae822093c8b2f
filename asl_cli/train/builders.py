"""Builders of a training run's parts from its resolved recipe: processes and device, data,
model, optimizer and schedule. `asl train` uses them, and so does the training-speed benchmark."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt_io
from ..bn_relu import fuse_bn_relu
from ..config import ConfigError
from ..data import IMAGENET_MEAN, IMAGENET_STD, TensorBatches, imagenet_folders, load_tensor_data, steps_per_epoch
from ..nn import install_shift_grad_normalization, param_groups
from ..zoo import create_model


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def device_kind(spec: str) -> str:
    """'cuda' or 'cpu' for a train.device setting (auto: CUDA when a GPU is visible)."""
    return "cuda" if str(spec).startswith("cuda") or (spec == "auto" and torch.cuda.is_available()) else "cpu"


def setup_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


# Measured on one core (docs/training.md, "On the CPU"): compiling asnet20_16x1's step takes 25 s
# with an empty kernel cache and 2 s with a warm one, and saves 17 ms of a 194 ms step at batch
# 128; it pays after ~1500 steps cold and ~120 warm. Runs of a thousand steps or more compile.
COMPILE_MIN_STEPS = 1000


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would build with ($CXX, else g++ or clang++)."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_choice(setting, device: torch.device, world: int, steps_left: int) -> tuple[bool, str]:
    """Resolve train.compile (auto | true | false) for this run: whether to compile the model, and
    a line for the user saying why (empty when there is nothing to say)."""
    if setting is not True and setting is not False:  # auto: the CPU's fastest correct step when it pays
        if device.type != "cpu" or world > 1 or steps_left < COMPILE_MIN_STEPS:
            return False, ""
        if cxx_compiler() is None:
            return False, "no C++ compiler (g++, clang++ or $CXX) found, so torch.compile cannot build CPU kernels: training eagerly"
        return True, f"compiling the training step with torch.compile (train.compile=auto); kernels are cached in {inductor_cache()}"
    if setting and device.type == "cpu" and cxx_compiler() is None:
        raise ConfigError("train.compile=true on the CPU needs a C++ compiler (g++, clang++ or $CXX); set train.compile=auto or false")
    return bool(setting), ""


def inductor_cache() -> Path:
    """Where torch.compile keeps its compiled kernels: the user's $TORCHINDUCTOR_CACHE_DIR, else
    beside the image cache ($ASL_CACHE_DIR or ~/.cache/asl) rather than torch's default under /tmp,
    so that a later run, after a reboot too, starts without recompiling."""
    from .. import USER_INDUCTOR_CACHE
    from ..data.folder import cache_dir

    path = USER_INDUCTOR_CACHE or str(cache_dir("auto") / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # torch's compiler reads it on every lookup
    return Path(path)


def pick_device(spec: str, d: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device asks for CUDA but no GPU is visible; use train.device=cpu")
        return torch.device("cuda", d.local_rank) if spec == "cuda" else torch.device(spec)
    if spec != "cpu":
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return torch.device("cpu")


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across processes (CPU
    processes under gloo; nn.SyncBatchNorm covers CUDA). Differentiable through the all-reduce."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.shape[1]
        xf = x.float()
        n_local = xf.numel() // C
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), xf.new_tensor([n_local])])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
                self.num_batches_tracked += 1
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_allreduce_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_allreduce_bn(child)
    return module


class FolderStream:
    """ImageFolder batches from a given global step on (DistributedSampler-style sharding)."""

    def __init__(self, dataset, batch_size: int, seed: int, d: Dist, workers: int):
        if batch_size % d.world:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes ({d.world})")
        self.ds, self.batch_size, self.seed, self.d, self.workers = dataset, batch_size, seed, d, workers
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size)

    def iterate(self, start: int):
        from torch.utils.data import DataLoader, Subset

        local = self.batch_size // self.d.world
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.ds), generator=g)[: self.steps_per_epoch * self.batch_size]
            mine = perm.view(self.steps_per_epoch, self.d.world, local)[skip:, self.d.rank].reshape(-1).tolist()
            loader = DataLoader(Subset(self.ds, mine), batch_size=local, shuffle=False, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available(), persistent_workers=False)
            yield from loader
            epoch, skip = epoch + 1, 0


@dataclass
class TrainData:
    """What the loop needs from a data set: batches from any global step on, and test batches."""

    num_classes: int
    input_size: int
    n_train: int
    steps_per_epoch: int
    preprocessing: dict  # recorded in checkpoints so that eval and predict prepare inputs alike
    batches_from: Callable[[int], Iterator]
    test_batches: Callable[[], Iterator]


def build_data(cfg: dict, d: Dist, device: torch.device) -> TrainData:
    t, dcfg = cfg["train"], cfg["data"]
    if dcfg["dataset"] == "imagenet":
        tr, te = imagenet_folders(dcfg["root"], dcfg["image_size"], dcfg["resize"])
        stream = FolderStream(tr, t["batch_size"], t["seed"], d, dcfg["workers"])

        def test_folder():
            from torch.utils.data import DataLoader

            return iter(DataLoader(te, batch_size=t["eval_batch_size"], num_workers=dcfg["workers"]))

        prep = {"kind": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": dcfg["resize"], "crop": dcfg["image_size"]}
        return TrainData(len(tr.classes), dcfg["image_size"], len(tr), stream.steps_per_epoch, prep, stream.iterate, test_folder)
    data = load_tensor_data(cfg)
    data_device = device if dcfg["on_device"] else torch.device("cpu")
    tb = TensorBatches(data.x_train, data.y_train, t["batch_size"], data.mean, data.std, dcfg["augment"], t["seed"], data_device, d.rank, d.world)

    def batches_from(k):
        while True:
            yield tb.batch(k)
            k += 1

    prep = {"kind": "tensor", "mean": list(data.mean), "std": list(data.std), "input_size": data.image_size,
            "dataset": data.name, "encoding": data.encoding}
    return TrainData(data.num_classes, data.image_size, len(data.x_train), tb.steps_per_epoch, prep, batches_from,
                     lambda: tb.test_batches(data.x_test, data.y_test, t["eval_batch_size"]))


def total_steps(cfg: dict, steps_per_epoch: int) -> int:
    t = cfg["train"]
    return int(t["iterations"]) if t["iterations"] is not None else int(math.ceil(t["epochs"] * steps_per_epoch))


def use_channels_last(setting, device: torch.device) -> bool:
    """Resolve train.channels_last (auto | true | false). Auto: on the CPU, where asnet20_16x1's
    eager training step ran 1.3-1.4x faster in channels_last than in NCHW (docs/training.md, "On the CPU"):
    oneDNN's 1x1 and depthwise convolutions and ATen's BatchNorm are faster on NHWC there, and the
    active shift's kernels transpose NHWC images to planes in cache."""
    if setting is True or setting is False:
        return setting
    return device.type == "cpu"


def use_fused_bn_relu(setting, device: torch.device, channels_last: bool) -> bool:
    """Resolve train.fuse_bn_relu (auto | true | false). Auto: on the CPU in channels_last, where
    the fused kernel beat ATen's pair in both directions at every CIFAR layer size (in NCHW its
    backward lost to ATen's on 8 x 8 planes; on other devices BatchNormReLU2d is the plain pair)."""
    if setting is True or setting is False:
        return setting
    return device.type == "cpu" and channels_last


def build_model(cfg: dict, num_classes: int, d: Dist, device: torch.device, init_from=None) -> tuple[nn.Module, dict]:
    """The zoo model (seeded by train.seed), optionally started from another checkpoint's
    weights, with synchronised BatchNorm across processes, on the device in its memory format."""
    t = cfg["train"]
    torch.manual_seed(t["seed"])
    model_args = {"num_classes": num_classes, **cfg["model"]["args"]}
    try:
        model = create_model(cfg["model"]["name"], **model_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg['model']['name']}: {e}") from None
    if init_from is not None:
        src = ckpt_io.load(init_from, prefer="best")
        fresh = ckpt_io.load_model_state(model, src["model_state"], f"--init-from {src['_path']}", t["init_skip_mismatched"])
        if fresh:
            warnings.warn(f"--init-from: kept fresh initialisation for {', '.join(fresh)} (shapes differ)", stacklevel=2)
    if d.world > 1 and t["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_allreduce_bn(model)
    channels_last = use_channels_last(t["channels_last"], device)
    if use_fused_bn_relu(t["fuse_bn_relu"], device, channels_last):
        fuse_bn_relu(model)  # the same parameters and state-dict keys
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, model_args


def shift_lr_mult(cfg: dict) -> float:
    """The shifts' learning-rate multiplier for this run: optim.shift_lr_mult, scaled by
    sqrt(reference / iterations) when optim.shift_lr_reference_iterations is set. With normalised
    gradients every step moves a shift by a fixed length, and how far shifts travel was measured
    to depend on that length times the square root of the number of steps (results/README.md)."""
    o, ref = cfg["optim"], cfg["optim"].get("shift_lr_reference_iterations")
    return o["shift_lr_mult"] * math.sqrt(ref / cfg["train"]["iterations"]) if ref else o["shift_lr_mult"]


def build_optimizer(model: nn.Module, o: dict, device: torch.device, shift_mult: float | None = None) -> torch.optim.SGD:
    """SGD with the paper's parameter groups and the shifts' normalised gradient. On CUDA the fused
    update, which takes its learning rate as a device tensor (what a captured step needs)."""
    groups = param_groups(model, o["lr"], o["weight_decay"], o["shift_lr_mult"] if shift_mult is None else shift_mult,
                          o["normalize_shift_grad"])
    opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"] and o["momentum"] > 0,
                          fused=True if device.type == "cuda" else None)
    install_shift_grad_normalization(opt)
    return opt


def lr_factor(cfg: dict, total: int) -> Callable[[int], float]:
    s = cfg["schedule"]
    kind, warm = s["type"], int(s["warmup"])
    milestones = sorted(int(m) for m in s["milestones"])

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if kind == "multistep":
            return w * s["gamma"] ** sum(step >= m for m in milestones)
        if kind == "linear":
            return w * max(0.0, 1 - step / total)
        if kind == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return w

    return f


def build_schedule(opt: torch.optim.Optimizer, cfg: dict, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))
