"""Optimizer and schedule: SGD with the paper's parameter groups and the shifts' normalised
gradient, the shift learning-rate rule, the learning-rate schedule and the run's length."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..nn import install_shift_grad_normalization, param_groups


def total_steps(cfg: dict, steps_per_epoch: int) -> int:
    t = cfg["train"]
    return int(t["iterations"]) if t["iterations"] is not None else int(math.ceil(t["epochs"] * steps_per_epoch))


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
