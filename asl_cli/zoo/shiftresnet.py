"""ShiftNet's ShiftResNet for CIFAR (Wu et al. 2018; the left half of paper Table 3), as published
by its authors: conv-BN-ReLU stem, three stages of widths 16, 32, 64, and blocks
1x1 (-> width*eps) -> BN -> ReLU -> grouped integer 3x3 shift -> 1x1 (stride here) -> BN -> ReLU,
plus a shortcut (1x1 conv + BN when the shape changes)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import GroupedShift2d, conv1x1
from .registry import register


class ShiftBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: float):
        super().__init__()
        mid = int(cout * expansion)
        self.conv1 = conv1x1(cin, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shift = GroupedShift2d(mid)
        self.conv2 = conv1x1(mid, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(self.shift(out))))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class ShiftResNet(nn.Module):
    def __init__(self, depth: int = 20, expansion: float = 1, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ShiftResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, cin = [], 16
        for s, width in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(ShiftBlock(cin, width, 2 if (s > 0 and i == 0) else 1, expansion))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


for _d, _e in [(20, 1), (20, 3), (20, 6), (20, 9), (110, 6)]:
    register(f"shiftresnet{_d}_x{_e}", ShiftResNet, family="shiftresnet", dataset="cifar", input_size=32,
             description=f"ShiftNet's ShiftResNet-{_d}, expansion {_e} (paper Table 3, left)", depth=_d, expansion=_e)
