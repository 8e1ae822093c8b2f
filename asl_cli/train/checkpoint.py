"""Checkpoints: written atomically (temp file + rename), read with clear errors."""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .run_folder import RunFolder

FORMAT = "asl-checkpoint-1"


from ..errors import CheckpointError  # noqa: F401  (raised here; importable from here as before)


def state_checksum(state: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_atomic(obj: dict, path: Path) -> Path:
    """Writes obj with a checksum of its model_state (verified by load) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "model_state" in obj:
        obj = {**obj, "model_sha256": state_checksum(obj["model_state"])}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a kill before this line leaves the previous file untouched
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder (its checkpoints/<prefer>.pt, else last.pt)."""
    p = Path(path)
    if p.is_dir():
        folder = RunFolder(p)
        found = folder.find_checkpoint(prefer)
        if found is not None:
            return found
        if folder.config_file.exists():  # a run folder whose run has not saved its first checkpoint yet
            raise CheckpointError(f"{p} is a run folder with no checkpoint yet (its run stopped, or is still running, "
                                  f"before the first one was saved)")
        raise CheckpointError(f"{p} has no checkpoints/best.pt or checkpoints/last.pt (is it a run folder?)")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load(path: str | Path, prefer: str = "best") -> dict:
    p = resolve(path, prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        size = p.stat().st_size if p.is_file() else 0
        raise CheckpointError(f"{p} is not a readable checkpoint ({'empty file' if size == 0 else 'truncated or corrupt?'}): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("model_state"), dict):
        raise CheckpointError(f"{p} is not an asl checkpoint (no '{FORMAT}' format marker)")
    expected = ckpt.get("model_sha256")
    if expected is not None and state_checksum(ckpt["model_state"]) != expected:
        raise CheckpointError(f"{p} is corrupt: its weights do not match the checksum written with them")
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
    from ..zoo import create_model

    name, args = ckpt.get("model_name"), ckpt.get("model_args", {})
    try:
        model = create_model(name, **args)
    except (KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if e.args else e
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')} names a model this version cannot build "
                              f"({name!r} with {args}): {msg}") from None
    load_model_state(model, ckpt["model_state"], ckpt.get("_path", "checkpoint"))
    return model
