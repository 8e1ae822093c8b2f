"""ActiveShift2d and its fixed-shift variants (paper Table 4)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from ..ops import active_shift
from ..ops.checks import pair

__all__ = ["ActiveShift2d", "SHIFT_MODES", "grouped_shift", "shift_layers"]

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
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
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
