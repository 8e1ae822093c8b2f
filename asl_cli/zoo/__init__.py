"""The model zoo: `create_model(name, **overrides)`, `list_models()`, and counts that match the
paper's tables (`count_parameters`, `count_macs`)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import as_resnet, asnet, peers, shiftresnet  # noqa: F401  (register the families)
from .paper import PAPER
from .registry import ModelEntry, create_model, get_entry, list_models

__all__ = ["create_model", "list_models", "get_entry", "ModelEntry", "count_parameters", "count_macs", "model_summary", "PAPER"]


def count_parameters(model: nn.Module) -> int:
    """The paper's count: conv and FC weights and biases, 2 per ASL channel (learned or fixed),
    BN gamma and beta; BN running statistics are not counted."""
    from ..nn import shift_layers

    n = sum(p.numel() for p in model.parameters())
    n += sum(m.shift.numel() for _, m in shift_layers(model) if not m.learned)
    return n


def count_macs(model: nn.Module, input_size: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (FlopCounterMode FLOPs / 2), with the
    active shift counted as 4 per output element."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, 3, input_size, input_size, device=next(model.parameters()).device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2 // batch


def model_summary(name: str, **overrides) -> dict:
    """Name, dataset, input size, parameters, MACs, and the paper's figures beside them."""
    entry = get_entry(name)
    model = create_model(name, **overrides)
    paper = PAPER.get(name, {})
    return {
        "name": name,
        "family": entry.family,
        "dataset": entry.dataset,
        "input_size": entry.input_size,
        "params": count_parameters(model),
        "macs": count_macs(model, entry.input_size),
        "paper_params_m": paper.get("params_m"),
        "paper_macs_m": paper.get("macs_m"),
        "description": entry.description,
    }
