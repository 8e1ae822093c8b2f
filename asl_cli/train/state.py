"""A training run's state and its run folder: what a checkpoint holds and how it is restored,
the folder's lock, and the append-only logs (metrics.csv, shifts.csv) kept consistent with the
last checkpoint when a run resumes."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt_io
from ..config import dump
from ..errors import TrainingError
from ..nn import shift_layers
from .run_lock import RunFolderBusy, RunLock, remove_stale_temps
from .step import host_lrs

METRIC_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds", "images_per_s"]
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
# the run folder
# ---------------------------------------------------------------------------------------------
def new_run_dir(cfg: dict) -> Path:
    if cfg["output"]["dir"]:
        return Path(cfg["output"]["dir"])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg["output"]["runs_root"]) / f"{stamp}-{cfg['name']}-{cfg['model']['name']}"
    p, i = base, 2
    while p.exists():
        p, i = Path(f"{base}-{i}"), i + 1
    return p


def own(lock: RunLock, run_dir: Path) -> None:
    """Takes the folder's lock (held until the run ends) and removes what killed writers left."""
    try:
        lock.acquire(run_dir)
    except RunFolderBusy as e:
        raise TrainingError(str(e)) from None
    remove_stale_temps(run_dir)


def start_folder(run_dir: Path, cfg: dict, lock: RunLock) -> None:
    """A new run: refuse a folder that holds a run, clear logs of one that never checkpointed,
    write the resolved recipe before step 0."""
    def refuse_if_taken():
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise TrainingError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another output.dir")

    refuse_if_taken()
    own(lock, run_dir)
    refuse_if_taken()  # another process may have got there first
    leftovers = [f for f in ("metrics.csv", "shifts.csv") if (run_dir / f).exists()]
    if leftovers:  # an earlier run here stopped before its first checkpoint: its logs cannot be continued
        warnings.warn(f"{run_dir}: removing {', '.join(leftovers)} of an earlier run that saved no checkpoint", stacklevel=3)
        for f in leftovers:
            (run_dir / f).unlink()
    (run_dir / "config.yaml").write_text(dump(cfg))


def resume_folder(run_dir: Path, lock: RunLock | None) -> dict:
    """The last checkpoint of a run to resume (locking the folder and repairing best.pt when
    `lock` is given, i.e. in the main process)."""
    if lock is not None:
        own(lock, run_dir)
    state = ckpt_io.load(run_dir, prefer="last")
    lacking = [k for k in RESUME_KEYS if k not in state]
    if lacking:
        raise TrainingError(f"{state['_path']} holds weights but no training state ({', '.join(lacking)}), so the run cannot "
                            f"be resumed from it; start a new run with --init-from {state['_path']}")
    if lock is not None:
        repair_best(run_dir, state)
    return state


def update_config(run_dir: Path, cfg: dict) -> None:
    """Rewrites a resumed run's config.yaml when the config it continues with reads differently
    (call with the folder's lock held), so that the next resume uses the same."""
    path = run_dir / "config.yaml"
    text = dump(cfg)
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(run_dir: Path, obj: dict, is_best: bool) -> None:
    ckpt_io.save_atomic(obj, run_dir / "checkpoints" / "last.pt")
    if is_best:
        ckpt_io.save_atomic(obj, run_dir / "checkpoints" / "best.pt")
    append_shifts(run_dir / "shifts.csv", obj["step"], obj["shifts"])


def repair_best(run_dir: Path, state: dict) -> None:
    """A kill while best.pt was being written leaves the previous best.pt; last.pt of the same
    step holds the same state, so best.pt is restored from it."""
    if state.get("best_step") != state["step"]:
        return
    best = run_dir / "checkpoints" / "best.pt"
    try:
        if ckpt_io.load(best)["step"] == state["step"]:
            return
    except ckpt_io.CheckpointError:
        pass
    tmp = best.with_name(f".best.pt.tmp-{os.getpid()}")
    shutil.copyfile(state["_path"], tmp)
    os.replace(tmp, best)


def _lists(obj):
    return [_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _tuple(obj):
    return tuple(_tuple(v) for v in obj) if isinstance(obj, list) else obj


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k) for k in METRIC_COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def append_shifts(path: Path, step: int, shifts: dict) -> None:
    if not shifts:
        return
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(SHIFT_COLUMNS)
        for layer, s in shifts.items():
            for c, (a, b) in enumerate(s.tolist()):
                w.writerow([step, layer, c, f"{a:.6g}", f"{b:.6g}"])


SHIFT_COLUMNS = ["step", "layer", "channel", "alpha", "beta"]


def read_log(path: Path, columns: list[str]):
    """A run's CSV log as a DataFrame, and why it could not be used (None when it could). A file
    left empty or cut short by a kill or a full disk reads as no rows, never as an exception."""
    import pandas as pd

    empty = pd.DataFrame(columns=columns)
    if not path.exists():
        return empty, None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return empty, f"{path} is empty"
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        return empty, f"{path} cannot be read ({str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__})"
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        return empty, f"{path} lacks the column(s) {', '.join(lacking)}"
    df = df[pd.to_numeric(df["step"], errors="coerce").notna()]  # a half-written last line
    return df.astype({"step": int}), None


def truncate_logs(run_dir: Path, step: int, last_row: dict | None) -> None:
    """Drop log rows written after the checkpoint being resumed (they will be redone); an empty or
    damaged log is started again from what the checkpoint holds."""
    import pandas as pd

    m = run_dir / "metrics.csv"
    df, problem = read_log(m, METRIC_COLUMNS)
    if problem:
        warnings.warn(f"{problem}; its rows before step {step} are lost, logging continues", stacklevel=2)
    df = df[df["step"] <= step]
    if last_row is not None and not (df["step"] == step).any():  # killed between the checkpoint and its row
        df = pd.concat([df, pd.DataFrame([last_row])[METRIC_COLUMNS]], ignore_index=True) if len(df) else pd.DataFrame([last_row])[METRIC_COLUMNS]
    if m.exists() or len(df):
        df.to_csv(m, index=False)
    s = run_dir / "shifts.csv"
    if s.exists():
        df, problem = read_log(s, SHIFT_COLUMNS)
        if problem:
            warnings.warn(f"{problem}; the shift history before step {step} is lost, recording continues", stacklevel=2)
        df[df["step"] <= step].to_csv(s, index=False)
