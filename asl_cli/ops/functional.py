"""The operators as Python functions: argument handling, the dtypes each device serves, and the
autograd that torch.func transforms need."""
from __future__ import annotations

import torch
from torch import Tensor

from .autograd import apply_active_shift
from .checks import IntPair, pair

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def active_shift(input: Tensor, shift: Tensor, stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """Shift every channel of `input` by its own real (alpha, beta) with bilinear interpolation.

    Args:
        input: (N, C, H, W) tensor, contiguous or channels_last. float32/float64 on CPU; also
            float16/bfloat16 on CUDA (computed in float32).
        shift: (C, 2) tensor; shift[:, 0] = alpha moves along W, shift[:, 1] = beta along H. May stay
            float32 when the input is half precision.
        stride, padding: int or (h, w). Output size is (H + 2*padding - 1) // stride + 1.

    Returns the (N, C, H_out, W_out) output in the input's dtype and memory format.
    """
    if not isinstance(input, Tensor) or not isinstance(shift, Tensor):
        raise TypeError(f"active_shift: input and shift must be tensors, got {type(input).__name__} and {type(shift).__name__}")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    # The operator checks shapes, devices, stride and padding (C++ kernels, fake kernels and the
    # reference alike); which dtypes a device's kernels serve is this function's rule.
    allowed = _CUDA_DTYPES if input.device.type == "cuda" else _CPU_DTYPES
    if input.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"active_shift: input dtype {str(input.dtype).replace('torch.', '')} is not supported on {input.device.type}; use one of {names}")
    if torch.compiler.is_compiling():  # Dynamo cannot trace a Function with a jvp; the op is opaque to it
        return torch.ops.asl.active_shift(input, shift, [sh, sw], [ph, pw])
    return apply_active_shift(input, shift, [sh, sw], [ph, pw])


def shift_conv1x1(input: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                  stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """Inference: `conv2d(active_shift(input, shift, stride, padding), weight, bias) + residual` in
    one operator. On the CPU it shifts a cache-sized piece of the output at a time (at stride 1 on
    AVX-512, 32-pixel panels straight from the input; otherwise tiles of output rows) and multiplies
    it at once, never writing the shifted tensor; on CUDA it is the two operators in sequence.
    No autograd (use `active_shift` and a convolution for training)."""
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    return torch.ops.asl.shift_conv1x1(input, shift, weight, bias, residual, [sh, sw], [ph, pw])
