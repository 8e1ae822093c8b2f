"""Training: `engine.train` runs a recipe (set-up, resume, the step loop, evaluation and checkpoint
points); `builders` makes its parts (device, data, model, optimizer, schedule), `step` the
training step, `state` and `checkpoint` the run folder's records, `run_lock` its lock."""
from .engine import STOP_SIGNALS, Callbacks, evaluate, train  # noqa: F401
from ..errors import Interrupted, NonFiniteLoss, TrainingError  # noqa: F401
