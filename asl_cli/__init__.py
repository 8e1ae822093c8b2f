"""asl: the active shift layer (Jeon & Kim, NeurIPS 2018) as a PyTorch operator, with a model zoo
and an experiment suite that reproduces the paper."""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# torch.utils.cpp_extension warns "No CUDA runtime is found" whenever torch.compile or the
# benchmark timer imports it on a machine without CUDA; asl builds nothing at run time, so the
# warning says nothing about it.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

# The user's own choice of torch.compile's kernel cache, read before anything imports torch's
# compiler (which writes its default into the environment); see train.model_setup.inductor_cache.
USER_INDUCTOR_CACHE = _os.environ.get("TORCHINDUCTOR_CACHE_DIR")

from . import ops  # noqa: E402,F401  (registers torch.ops.asl.* and its Python parts)
from .ops import active_shift, backends  # noqa: E402,F401
