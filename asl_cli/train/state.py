"""A training run's state: what a checkpoint holds, how it is restored, and how it is saved into
and resumed from the run folder."""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt_io
from ..errors import TrainingError
from ..nn import shift_layers
from .run_folder import RunFolder
from .run_lock import RunLock
from .step import host_lrs

RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "accum", "step", "best_top1")


def unwrap(model: nn.Module) -> nn.Module:
    m = model.module if hasattr(model, "module") else model
    return getattr(m, "_orig_mod", m)


def clean_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def shift_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.shift.detach().float().cpu().clone() for name, layer in shift_layers(unwrap(model))}


@dataclass
class Accum:
    """Running training loss / accuracy since the last evaluation (float64 for exact resume)."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def state(self) -> dict:
        return dict(loss=self.loss, correct=self.correct, count=self.count)


@dataclass
class TrainState:
    """Where a run stands: the step, the best test top-1 and its step, the running training
    statistics since the last evaluation, and the last step with a checkpoint."""

    step: int = 0
    best: float = -1.0
    best_step: int | None = None
    acc: Accum = field(default_factory=Accum)
    last_good: int | None = None

    def checkpoint(self, *, cfg: dict, model: nn.Module, model_args: dict, opt, sched, scaler, device: torch.device,
                   total: int, steps_per_epoch: int, preprocessing: dict, row: dict | None) -> dict:
        """Everything an exact resume needs (weights, optimizer, schedule, RNG streams, statistics)
        and everything eval, predict and plot-shifts read (config, preprocessing, shifts)."""
        return {
            "format": ckpt_io.FORMAT,
            "model_name": cfg["model"]["name"],
            "model_args": model_args,
            "model_state": clean_state_dict(model),
            "optimizer": host_lrs(opt.state_dict()),
            "scheduler": host_lrs(sched.state_dict()),
            "scaler": scaler.state_dict(),
            "step": self.step,
            "total_steps": total,
            "epoch": self.step / steps_per_epoch,
            "best_top1": self.best,
            "best_step": self.best_step,
            "accum": self.acc.state(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "python": _lists(random.getstate())},
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
            "preprocessing": preprocessing,
            "shifts": shift_values(model),
            "last_row": row,
        }

    @classmethod
    def restore(cls, ckpt: dict, model: nn.Module, opt, sched, scaler, device: torch.device) -> "TrainState":
        """Loads a checkpoint's weights, optimizer, schedule, scaler and RNG streams into the run."""
        # model_state was saved from the plain module; AllReduce/Sync BN keep the same keys.
        ckpt_io.load_model_state(unwrap(model), ckpt["model_state"], ckpt["_path"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        random.setstate(_tuple(ckpt["rng"]["python"]))
        step = int(ckpt["step"])
        return cls(step, float(ckpt["best_top1"]), ckpt.get("best_step"), Accum(**ckpt["accum"]), step)


# ---------------------------------------------------------------------------------------------
# checkpoints in the run folder
# ---------------------------------------------------------------------------------------------
def resume(folder: RunFolder, lock: RunLock | None) -> dict:
    """The last checkpoint of a run to resume (locking the folder and repairing best.pt when
    `lock` is given, i.e. in the main process)."""
    if lock is not None:
        folder.own(lock)
    state = ckpt_io.load(folder.path, prefer="last")
    lacking = [k for k in RESUME_KEYS if k not in state]
    if lacking:
        raise TrainingError(f"{state['_path']} holds weights but no training state ({', '.join(lacking)}), so the run cannot "
                            f"be resumed from it; start a new run with --init-from {state['_path']}")
    if lock is not None:
        repair_best(folder, state)
    return state


def save(folder: RunFolder, obj: dict, is_best: bool) -> None:
    ckpt_io.save_atomic(obj, folder.last)
    if is_best:
        ckpt_io.save_atomic(obj, folder.best)
    folder.append_shifts(obj["step"], obj["shifts"])


def repair_best(folder: RunFolder, state: dict) -> None:
    """A kill while best.pt was being written leaves the previous best.pt; last.pt of the same
    step holds the same state, so best.pt is restored from it."""
    if state.get("best_step") != state["step"]:
        return
    try:
        if ckpt_io.load(folder.best)["step"] == state["step"]:
            return
    except ckpt_io.CheckpointError:
        pass
    tmp = folder.best.with_name(f".best.pt.tmp-{os.getpid()}")
    shutil.copyfile(state["_path"], tmp)
    os.replace(tmp, folder.best)


def _lists(obj):
    return [_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _tuple(obj):
    return tuple(_tuple(v) for v in obj) if isinstance(obj, list) else obj
