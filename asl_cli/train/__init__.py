"""Training: `engine.train` runs a recipe (set-up, resume, the step loop, evaluation and checkpoint
points); its parts come from `distributed` (processes, device), `model_setup` (model, memory
format, compile), `optim` (optimizer, shift-rate rule, schedule) and `data.streams`; `step` is the
training step, `state` what a checkpoint holds, `checkpoint` its files, `run_folder` the run
folder (file names, config, logs), `run_lock` its lock."""
from .engine import STOP_SIGNALS, Callbacks, evaluate, train  # noqa: F401
from ..errors import Interrupted, NonFiniteLoss, TrainingError  # noqa: F401
from .run_folder import RunFolder  # noqa: F401
