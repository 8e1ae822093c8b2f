"""ASNet for CIFAR (paper Table 3): depth 6n+2, base width b, expansion eps.

Stem 3x3 conv 3->b; three stages of widths b, 2b, 4b with n pre-activation blocks each (the first
block of stages 2 and 3 downsamples with a stride-2 spatial layer); BN-ReLU, global average pool,
FC. Depth counts convs and FC, not shift layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import PreActBlock, bn_relu
from .registry import register


class ASNet(nn.Module):
    def __init__(self, depth: int = 20, base_width: int = 16, expansion: float = 1, num_classes: int = 10,
                 spatial: str = "asl", shift_mode: str = "TR", shift_seed: int = 0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ASNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        g = torch.Generator().manual_seed(shift_seed)
        self.stem = nn.Conv2d(3, base_width, 3, padding=1, bias=False)
        stages, cin = [], base_width
        for s, width in enumerate([base_width, 2 * base_width, 4 * base_width]):
            blocks = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(PreActBlock(cin, width, int(round(width * expansion)), stride, spatial, shift_mode, g))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.head = bn_relu(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


for _d, _b, _e in [(20, 16, 1), (20, 16, 3), (20, 16, 6), (20, 16, 9), (20, 46, 1), (20, 88, 1), (110, 16, 6)]:
    register(f"asnet{_d}_{_b}x{_e}", ASNet, family="asnet", dataset="cifar", input_size=32,
             description=f"ASNet-{_d}, base width {_b}, expansion {_e} (paper Table 3)",
             depth=_d, base_width=_b, expansion=_e)
