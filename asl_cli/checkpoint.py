"""Checkpoints: written atomically (temp file + rename), read with clear errors."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "asl-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def save_atomic(obj: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a kill before this line leaves the previous file untouched
    return path


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder (its checkpoints/<prefer>.pt, else last.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in (prefer, "last", "best"):
            cand = p / "checkpoints" / f"{name}.pt"
            if cand.exists():
                return cand
        raise CheckpointError(f"{p} has no checkpoints/best.pt or checkpoints/last.pt (is it a run folder?)")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load(path: str | Path, prefer: str = "best") -> dict:
    p = resolve(path, prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{p} is not a readable checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model_state" not in ckpt:
        raise CheckpointError(f"{p} is not an asl checkpoint (no '{FORMAT}' format marker)")
    ckpt["_path"] = str(p)
    return ckpt


def load_model_state(model: nn.Module, state: dict, source: str, skip_mismatched: bool = False) -> list[str]:
    """Strict load with a message that names what did not fit. With skip_mismatched, entries whose
    shapes differ (a new classifier when fine-tuning on another dataset) keep their fresh
    initialisation; their names are returned."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    if skip_mismatched and mismatched and not missing and not unexpected:
        model.load_state_dict({k: (own[k] if k in mismatched else v) for k, v in state.items()})
        return mismatched
    if missing or unexpected or shapes:
        hint = " (to fine-tune on another number of classes, set train.init_skip_mismatched=true)" if shapes and not (missing or unexpected) else ""
        parts = []
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            parts.append(f"missing in checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"not in model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts) + hint)
    model.load_state_dict(state)
    return []


def build_model(ckpt: dict) -> nn.Module:
    """The zoo model a checkpoint was made from, with its weights loaded."""
    from .zoo import create_model

    model = create_model(ckpt["model_name"], **ckpt.get("model_args", {}))
    load_model_state(model, ckpt["model_state"], ckpt.get("_path", "checkpoint"))
    return model
