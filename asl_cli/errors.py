"""The exceptions training raises; the CLI turns each into one message and an exit status."""
from __future__ import annotations

from pathlib import Path


class TrainingError(RuntimeError):
    pass


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, run_dir: Path, last_good: int | None, what: str = "the loss became non-finite"):
        self.step, self.run_dir, self.last_good = step, run_dir, last_good
        kept = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint had been written yet"
        super().__init__(f"{what} at step {step}; training stopped and {kept} in {run_dir}")


class Interrupted(TrainingError):
    def __init__(self, step: int, run_dir: Path, signum: int | None = None):
        self.step, self.run_dir, self.signum = step, run_dir, signum
        super().__init__(f"interrupted; a checkpoint at step {step} was saved in {run_dir}")
