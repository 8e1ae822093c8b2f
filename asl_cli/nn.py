"""ActiveShift2d, its fixed-shift variants (paper Table 4), and the original training rule for
shifts: a per-channel normalized gradient and optimizer parameter groups."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .ops import _pair, active_shift

__all__ = [
    "ActiveShift2d",
    "SHIFT_MODES",
    "grouped_shift",
    "shift_layers",
    "normalize_shift_grad_",
    "install_shift_grad_normalization",
    "param_groups",
]

# Paper Table 4: variant -> (shifting domain, initialisation, learned); TN, not in the paper,
# learns from SR's start (the same N(0,1) draw for the same generator) to tell initialisation
# from learning apart.
SHIFT_MODES = {
    "GS": ("integer", "grouped 3x3 displacements (ShiftNet heuristic)", False),
    "SI": ("integer", "N(0,1) rounded", False),
    "SR": ("real", "N(0,1)", False),
    "TR": ("real", "U[-1,1]", True),
    "TN": ("real", "N(0,1)", True),
}


def grouped_shift(channels: int, kernel_size: int = 3) -> Tensor:
    """ShiftNet's heuristic assignment (paper Eq. 5): contiguous groups of floor(C / K^2) channels,
    group g gets the g-th displacement of the K x K kernel in row-major order (alpha = column
    offset, beta = row offset); the remainder channels stay unshifted."""
    k2 = kernel_size * kernel_size
    group = channels // k2
    shift = torch.zeros(channels, 2)
    if group == 0:
        return shift
    half = kernel_size // 2
    for g in range(k2):
        dy, dx = g // kernel_size - half, g % kernel_size - half
        shift[g * group : (g + 1) * group, 0] = dx
        shift[g * group : (g + 1) * group, 1] = dy
    return shift


def _initial_shift(channels: int, mode: str, generator: torch.Generator | None) -> Tensor:
    if mode == "TR":
        return torch.rand(channels, 2, generator=generator) * 2 - 1
    if mode in ("SR", "TN"):
        return torch.randn(channels, 2, generator=generator)
    if mode == "SI":
        return torch.randn(channels, 2, generator=generator).round()
    if mode == "GS":
        return grouped_shift(channels)
    raise ValueError(f"shift_mode must be one of {', '.join(SHIFT_MODES)}, got {mode!r}")


class ActiveShift2d(nn.Module):
    """Depthwise shift by a real (alpha, beta) per channel with bilinear interpolation.

    mode "TR" (default) learns the shift, initialised U[-1, 1]; "SR", "SI" and "GS" hold fixed
    shifts (a buffer saved in the state dict, not a parameter) drawn from `generator`.
    """

    def __init__(self, channels: int, stride=1, padding=0, mode: str = "TR", generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"ActiveShift2d: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        mode = mode.upper()
        init = _initial_shift(channels, mode, generator)
        self.mode = mode
        if SHIFT_MODES[mode][2]:
            self.shift = nn.Parameter(init)
        else:
            self.register_buffer("shift", init)

    @property
    def learned(self) -> bool:
        return isinstance(self.shift, nn.Parameter)

    def forward(self, x: Tensor) -> Tensor:
        return active_shift(x, self.shift, self.stride, self.padding)

    def __prepare_scriptable__(self):
        raise RuntimeError("torch.jit.script does not support ActiveShift2d (the layer calls torch.ops.asl.active_shift with "
                           "Python-side argument handling); use torch.jit.trace, torch.export or torch.compile instead")

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, padding={self.padding}, mode={self.mode}"


def shift_layers(model: nn.Module) -> Iterator[tuple[str, ActiveShift2d]]:
    """(name, layer) for every ActiveShift2d in the model, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, ActiveShift2d):
            yield name, m


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
