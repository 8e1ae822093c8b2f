"""The original training rule for shifts: a per-channel normalized gradient and optimizer
parameter groups (learned shifts at a smaller learning rate and no weight decay)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .shift import shift_layers

__all__ = ["normalize_shift_grad_", "install_shift_grad_normalization", "param_groups"]


@torch.no_grad()
def normalize_shift_grad_(params: Iterable[Tensor]) -> None:
    """Scale each channel's (g_alpha, g_beta) to unit L2 norm where it is non-zero (in place)."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        g.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))


def install_shift_grad_normalization(optimizer: torch.optim.Optimizer):
    """Normalize the gradients of every parameter group flagged `normalize_grad` right before each
    optimizer step, i.e. once the gradients are complete (after DDP's all-reduce and any gradient
    accumulation). Returns the hook handle."""

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            if group.get("normalize_grad"):
                normalize_shift_grad_(group["params"])

    return optimizer.register_step_pre_hook(hook)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    shift_lr_mult: float = 0.01,
    normalize_shift_grad: bool = True,
) -> list[dict]:
    """Optimizer parameter groups following the original training rule.

    - "shift": learned ASL shifts, lr * shift_lr_mult, no weight decay, flagged for the normalized
      gradient (see `install_shift_grad_normalization`);
    - "no_decay": BatchNorm weights and biases, and every bias, no weight decay;
    - "decay": everything else, with `weight_decay`.
    Empty groups are left out. Each group carries an explicit lr so schedulers scale them alike.
    """
    shift_ids = {id(m.shift) for _, m in shift_layers(model) if m.learned}
    bn_ids = set()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            bn_ids.update(id(p) for p in m.parameters(recurse=False))
    groups = {"shift": [], "no_decay": [], "decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in shift_ids:
            groups["shift"].append(p)
        elif id(p) in bn_ids or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    out = []
    if groups["shift"]:
        out.append(dict(name="shift", params=groups["shift"], lr=lr * shift_lr_mult, weight_decay=0.0, normalize_grad=normalize_shift_grad))
    if groups["no_decay"]:
        out.append(dict(name="no_decay", params=groups["no_decay"], lr=lr, weight_decay=0.0))
    if groups["decay"]:
        out.append(dict(name="decay", params=groups["decay"], lr=lr, weight_decay=weight_decay))
    return out
