"""The active shift operator and its companions, registered as `torch.ops.asl.*`.

`torch.ops.asl.active_shift(input, shift, stride, padding)` samples every channel c of an
(N, C, H, W) input bilinearly at (row, col) = (i*sh - ph + beta_c, j*sw - pw + alpha_c), with zeros
outside the image; `shift` is (C, 2) = (alpha, beta). Non-finite shifts are not an error: the
channels they belong to come out as NaN (as do their gradients), so one bad value is visible
without a device synchronisation on every call.

Modules, in the order they register:
  library          the compiled kernels, or the schemas and reference kernels without them; `backends()`
  checks           the kernels' argument rules, shared by the fake kernels and the reference
  reference        the pure-PyTorch specification (and the F.grid_sample peer)
  fake             fake kernels for torch.compile / torch.export
  autograd         reverse and forward mode, torch.func batching rules
  flops            formulas for torch.utils.flop_counter
  batch_norm_relu  the fused BatchNorm-ReLU training operator
  batch_norm_relu_shift  a block's BatchNorm-ReLU and active shift in training as one operator
  batch_norm_relu_conv   a block's pre-activation BatchNorm-ReLU and first 1x1 convolution in training
  functional       `active_shift` and `shift_conv1x1`, the functions to call
"""
from __future__ import annotations

from . import library
from . import fake, autograd, flops, batch_norm_relu, batch_norm_relu_shift, batch_norm_relu_conv  # noqa: F401  (registration)
from .batch_norm_relu import reference_batch_norm_relu, reference_batch_norm_relu_backward
from .batch_norm_relu_conv import reference_batch_norm_relu_conv1x1
from .batch_norm_relu_shift import reference_batch_norm_relu_shift
from .checks import output_size
from .functional import active_shift, shift_conv1x1
from .library import FALLBACK_SCHEMAS, backends
from .reference import grid_sample_shift, reference_active_shift

__all__ = ["active_shift", "shift_conv1x1", "reference_active_shift", "backends", "output_size", "grid_sample_shift",
           "reference_batch_norm_relu", "reference_batch_norm_relu_backward", "reference_batch_norm_relu_shift",
           "reference_batch_norm_relu_conv1x1", "FALLBACK_SCHEMAS"]
