"""The model a run trains and how it executes: the zoo model (optionally from another checkpoint's
weights) with synchronised BatchNorm, its memory format, fused BatchNorm-ReLU pairs, and whether
torch.compile builds the step."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt_io
from ..config import ConfigError
from ..nn import fuse_bn_relu
from ..zoo import create_model
from .distributed import Dist, convert_allreduce_bn


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
