"""asl: the active shift layer (Jeon & Kim, NeurIPS 2018) as a PyTorch operator, with a model zoo
and an experiment suite that reproduces the paper."""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.asl.* and its Python parts)
from .ops import active_shift, backends  # noqa: E402,F401
