"""Building blocks shared by the zoo's families."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import ActiveShift2d, ResidualConv2d, bn_relu_conv_skip, bn_relu_shift, grouped_shift
from ..ops import active_shift

SPATIAL = {
    "asl": "1B-ASL-1: BN-ReLU, 1x1, BN-ReLU, active shift, 1x1",
    "dw3_bn": "1B-DW3-B-1: BN-ReLU, 1x1, BN-ReLU, 3x3 depthwise, BN-ReLU, 1x1",
    "dw3": "1B-DW3-1: BN-ReLU, 1x1, BN-ReLU, 3x3 depthwise, 1x1",
}


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))


def spatial_layer(kind: str, channels: int, stride: int, shift_mode: str, generator: torch.Generator | None) -> nn.Module:
    """The block's spatial operator: an active shift, or a 3x3 depthwise conv (with BN-ReLU)."""
    if kind == "asl":
        return ActiveShift2d(channels, stride=stride, mode=shift_mode, generator=generator)
    if kind in ("dw3", "dw3_bn"):
        dw = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        return nn.Sequential(dw, *bn_relu(channels)) if kind == "dw3_bn" else dw
    raise ValueError(f"spatial must be one of {', '.join(SPATIAL)}, got {kind!r}")


class PreActBlock(nn.Module):
    """BN-ReLU -> 1x1 (-> mid) -> BN-ReLU -> spatial (stride) -> 1x1 (-> out) -> + shortcut.

    A block that changes shape has a 1x1 strided projection (no BN) applied to the pre-activated
    input; otherwise the shortcut is the raw input (pre-activation residual, paper ref. [7])."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int, spatial: str = "asl", shift_mode: str = "TR",
                 generator: torch.Generator | None = None, project: bool | None = None):
        super().__init__()
        self.preact = bn_relu(cin)
        self.conv1 = conv1x1(cin, mid)
        self.bn1 = bn_relu(mid)
        self.spatial = spatial_layer(spatial, mid, stride, shift_mode, generator)
        self.conv2 = ResidualConv2d(mid, cout, 1, bias=False)  # adds the shortcut (one call where fused)
        if project is None:
            project = stride != 1 or cin != cout
        self.shortcut = conv1x1(cin, cout, stride) if project else None

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is None:  # x goes on to the addition: its two gradients summed in preact's backward where fused
            t, x = bn_relu_conv_skip(self.preact, self.conv1, x)  # conv1(preact(x)), one call where fused
            h = bn_relu_shift(self.bn1, self.spatial, t)  # spatial(bn1(.)), fused where it can be
            return self.conv2(h, x)
        pre = self.preact(x)
        h = bn_relu_shift(self.bn1, self.spatial, self.conv1(pre))
        return self.conv2(h, self.shortcut(pre))


class GroupedShift2d(nn.Module):
    """ShiftNet's fixed 3x3 grouped integer shift: an architectural constant, not a parameter
    (a non-persistent buffer), computed with the active shift operator."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.register_buffer("shift", grouped_shift(channels, kernel_size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return active_shift(x, self.shift.to(x.device))
