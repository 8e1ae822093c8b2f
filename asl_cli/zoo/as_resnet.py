"""AS-ResNet for ImageNet (paper Table 6): a 3x3 stride-2 stem to width w, one stride-1 block of
width w, then stages of widths w, 2w, 4w, 8w with 3, 4, 6, 3 blocks whose first block has a
stride-2 active shift and a 1x1 stride-2 projection shortcut; expansion 1; BN-ReLU, global
average pool, FC."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import PreActBlock, bn_relu
from .registry import register

STAGES = ((1, 3, 4, 6, 3), (1, 1, 2, 4, 8))  # blocks per stage, width multiplier per stage


class ASResNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 1000, expansion: float = 1, spatial: str = "asl",
                 shift_mode: str = "TR", shift_seed: int = 0):
        super().__init__()
        if width < 1:
            raise ValueError(f"AS-ResNet width must be >= 1, got {width}")
        g = torch.Generator().manual_seed(shift_seed)
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        stages, cin = [], width
        for s, (n, mult) in enumerate(zip(*STAGES)):
            blocks = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                cout = width * mult
                blocks.append(PreActBlock(cin, cout, int(round(cout * expansion)), stride, spatial, shift_mode, g,
                                          project=stride != 1 or cin != cout))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = bn_relu(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.stages(self.stem(x)))), 1))


for _w in (32, 50, 68):
    register(f"as_resnet_w{_w}", ASResNet, family="as_resnet", dataset="imagenet", input_size=224,
             description=f"AS-ResNet, base width {_w} (paper Tables 5 and 6)", width=_w)
