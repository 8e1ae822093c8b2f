"""Peers for comparisons: torchvision's MobileNetV2 at the paper's width multipliers."""
from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2

from .registry import register


def mobilenet_v2_peer(width_mult: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """torchvision's MobileNetV2 (randomly initialised; no weights are downloaded)."""
    return mobilenet_v2(weights=None, width_mult=width_mult, num_classes=num_classes)


for _m in ("1.0", "0.75", "0.5"):
    register(f"mobilenet_v2_x{_m}", mobilenet_v2_peer, family="mobilenet_v2", dataset="imagenet", input_size=224,
             description=f"MobileNetV2 x{_m} (torchvision; paper Table 5 peer)", width_mult=float(_m))
