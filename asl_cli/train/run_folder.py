"""A training run's folder: the one place that names its files, reads and writes its config, owns
its lock, and keeps its append-only logs (metrics.csv, shifts.csv) consistent with the last
checkpoint when a run resumes.

    <run>/config.yaml           the resolved recipe, written before step 0
    <run>/metrics.csv           one row per evaluation
    <run>/shifts.csv            every shift at every checkpoint
    <run>/progress.json         the live progress a sweep worker or cluster job reports
    <run>/checkpoints/last.pt   the latest checkpoint (best.pt: the best test top-1's)
    <run>/.lock                 held by the training process for the run's life
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import warnings
from pathlib import Path

from ..config import ConfigError, dump, format_differences, load_config, training_differences
from ..errors import TrainingError
from .run_lock import RunLock

METRIC_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds", "images_per_s"]
SHIFT_COLUMNS = ["step", "layer", "channel", "alpha", "beta"]


class RunFolder:
    """The folder of one training run (which need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- names ---------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def shifts(self) -> Path:
        return self.path / "shifts.csv"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str = "last") -> Path:
        return self.checkpoints / f"{name}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    def has_checkpoint(self) -> bool:
        """Whether a run here saved its first checkpoint (it can be resumed, or reused)."""
        return self.last.exists()

    def find_checkpoint(self, prefer: str = "best") -> Path | None:
        """checkpoints/<prefer>.pt, else last.pt, else best.pt; None when there is none."""
        return next((p for p in (self.checkpoint(n) for n in (prefer, "last", "best")) if p.exists()), None)

    @classmethod
    def new(cls, cfg: dict) -> "RunFolder":
        """output.dir, or a fresh <runs_root>/<time>-<name>-<model> that does not exist yet."""
        if cfg["output"]["dir"]:
            return cls(cfg["output"]["dir"])
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg["output"]["runs_root"]) / f"{stamp}-{cfg['name']}-{cfg['model']['name']}"
        p, i = base, 2
        while p.exists():
            p, i = Path(f"{base}-{i}"), i + 1
        return cls(p)

    # -- the config ----------------------------------------------------------------------------
    def load_config(self) -> dict:
        """The run's resolved config (ConfigError when the folder has none or it does not read)."""
        if not self.config_file.exists():
            raise ConfigError(f"{self.path} is not a run folder (no config.yaml)")
        return load_config(str(self.config_file))

    def write_config(self, cfg: dict) -> None:
        """Writes config.yaml atomically, unless it already reads the same (call with the lock held)."""
        text = dump(cfg)
        try:
            if self.config_file.read_text() == text:
                return
        except OSError:
            pass
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)

    def resume_config(self, recipe: str | None = None, overrides: list[str] | tuple = ()) -> dict:
        """The config a resumed run continues with: its own, with a recipe or overrides allowed only
        where they change no training setting (a moved data folder, another log interval)."""
        saved = self.load_config()
        if not recipe and not overrides:
            return saved
        wanted = load_config(recipe or str(self.config_file), overrides)
        wanted["output"]["dir"] = saved["output"]["dir"]
        diffs = training_differences(saved, wanted)
        if diffs:
            raise ConfigError(f"the run in {self.path} was trained with other settings than these (saved -> asked): "
                              f"{format_differences(diffs)}. A resumed run keeps its own; start a new run instead "
                              f"(another output.dir, optionally --init-from {self.path} to start from its weights), or drop "
                              f"those overrides to continue it as it was")
        return wanted

    # -- ownership and starting ----------------------------------------------------------------
    def own(self, lock: RunLock) -> None:
        """Takes the folder's lock (held until the run ends) and removes what killed writers left."""
        lock.acquire(self.path)  # RunFolderBusy (a TrainingError) when another process holds it
        for p in self.checkpoints.glob(".*.tmp-*"):  # a process killed mid-write
            p.unlink(missing_ok=True)

    def start(self, cfg: dict, lock: RunLock) -> None:
        """A new run: refuse a folder that holds a run, clear logs of one that never checkpointed,
        write the resolved recipe before step 0."""
        def refuse_if_taken():
            if self.has_checkpoint():
                raise TrainingError(f"{self.path} already holds a run; resume it with --resume {self.path} or choose another output.dir")

        refuse_if_taken()
        self.own(lock)
        refuse_if_taken()  # another process may have got there first
        leftovers = [p for p in (self.metrics, self.shifts) if p.exists()]
        if leftovers:  # an earlier run here stopped before its first checkpoint: its logs cannot be continued
            warnings.warn(f"{self.path}: removing {', '.join(p.name for p in leftovers)} of an earlier run that saved no checkpoint",
                          stacklevel=3)
            for p in leftovers:
                p.unlink()
        self.config_file.write_text(dump(cfg))

    def clear_unfinished(self) -> None:
        """Removes the records of a run that never checkpointed, so they cannot mix with a new one."""
        for p in (self.config_file, self.metrics, self.shifts, self.progress):
            p.unlink(missing_ok=True)

    # -- logs ----------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        new = not self.metrics.exists()
        with open(self.metrics, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k) for k in METRIC_COLUMNS})
            f.flush()
            os.fsync(f.fileno())

    def append_shifts(self, step: int, shifts: dict) -> None:
        if not shifts:
            return
        new = not self.shifts.exists()
        with open(self.shifts, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(SHIFT_COLUMNS)
            for layer, s in shifts.items():
                for c, (a, b) in enumerate(s.tolist()):
                    w.writerow([step, layer, c, f"{a:.6g}", f"{b:.6g}"])

    def truncate_logs(self, step: int, last_row: dict | None) -> None:
        """Drop log rows written after the checkpoint being resumed (they will be redone); an empty or
        damaged log is started again from what the checkpoint holds."""
        import pandas as pd

        df, problem = read_log(self.metrics, METRIC_COLUMNS)
        if problem:
            warnings.warn(f"{problem}; its rows before step {step} are lost, logging continues", stacklevel=2)
        df = df[df["step"] <= step]
        if last_row is not None and not (df["step"] == step).any():  # killed between the checkpoint and its row
            df = pd.concat([df, pd.DataFrame([last_row])[METRIC_COLUMNS]], ignore_index=True) if len(df) else pd.DataFrame([last_row])[METRIC_COLUMNS]
        if self.metrics.exists() or len(df):
            df.to_csv(self.metrics, index=False)
        if self.shifts.exists():
            df, problem = read_log(self.shifts, SHIFT_COLUMNS)
            if problem:
                warnings.warn(f"{problem}; the shift history before step {step} is lost, recording continues", stacklevel=2)
            df[df["step"] <= step].to_csv(self.shifts, index=False)


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
