"""Every error the package raises on purpose, each with the exit status the command line ends with
(`asl_cli.cli.app` turns any of them into one message and that status):

    0 done; 1 the work failed (missing data, an unreadable checkpoint, a diverged model);
    2 a command line or recipe to change; 3 a training run whose loss became non-finite (the last
    finite checkpoint is kept); 130 interrupted.

Each also derives from the built-in exception it has always been (ValueError, RuntimeError,
KeyError), so code that catches those keeps working.
"""
from __future__ import annotations

from pathlib import Path


class AslError(Exception):
    """An error whose message says what went wrong and what to do; `exit_code` is the CLI's status."""

    exit_code = 1

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else self.__class__.__name__


# -- exit 2: something to change on the command line or in the recipe ---------------------------
class ConfigError(AslError, ValueError):
    """A recipe or override that cannot be used; the message says what to change."""

    exit_code = 2


class UnknownModel(AslError, KeyError):
    """A model name that is not in the zoo (nor a checkpoint file)."""

    exit_code = 2


class MissingRuntime(AslError, RuntimeError):
    """The optional deploy packages (onnx, onnxruntime, onnxscript) are not installed."""

    exit_code = 2


# -- exit 1: the work failed ---------------------------------------------------------------------
class DataError(AslError, RuntimeError):
    """A data set that is missing, unreadable or unusable."""


class ImageError(AslError, ValueError):
    """An image file that cannot be read or prepared as a model input."""


class CheckpointError(AslError, RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class ExportError(AslError, ValueError):
    """A model (or layer) the exporter cannot express in standard ONNX operators."""


class CaffeFormatError(AslError, ValueError):
    """The file is not a readable Caffe model (truncated, corrupt, or another format)."""


class CaffeMismatch(AslError, ValueError):
    """The Caffe file does not fit the chosen architecture; the message names what did not fit."""


class TrainingError(AslError, RuntimeError):
    """A run that cannot start or go on (a busy run folder, a run that cannot be resumed...)."""


class RunFolderBusy(TrainingError):
    """Another training process holds the run folder's lock."""


class NonFiniteLoss(TrainingError):
    exit_code = 3

    def __init__(self, step: int, run_dir: Path, last_good: int | None, what: str = "the loss became non-finite"):
        self.step, self.run_dir, self.last_good = step, run_dir, last_good
        kept = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint had been written yet"
        super().__init__(f"{what} at step {step}; training stopped and {kept} in {run_dir}")


class Interrupted(TrainingError):
    """A run stopped by a signal after saving a checkpoint; `next_step` tells the user how to go on
    (set by whoever knows: a sweep is continued by running it again, a run by --resume)."""

    exit_code = 130

    def __init__(self, step: int, run_dir: Path, signum: int | None = None):
        self.step, self.run_dir, self.signum = step, run_dir, signum
        self.next_step = f"Resume with: asl train --resume {run_dir}"
        super().__init__(f"interrupted; a checkpoint at step {step} was saved in {run_dir}")
