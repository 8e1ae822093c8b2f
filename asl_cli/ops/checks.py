"""Argument rules the compiled kernels enforce (ext/*.cpp: `check_args`, `check_vector`,
`check_weight`, `check_conv1x1`, `check_pointwise`, `check_training`), written once for the fake
kernels that torch.compile traces with and for the reference fallback: same rules, same exception
types (ValueError, TypeError). Also the small shape helpers every operator module uses."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

IntPair = Union[int, Sequence[int]]


def pair(v: IntPair, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair (bools refused: True is not a stride)."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in (a, b)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (a, b)


def output_size(size: int, stride: int, padding: int) -> int:
    """Output extent of one spatial axis: (size + 2*padding - 1) // stride + 1 (0 when empty)."""
    return 0 if size == 0 else (size + 2 * padding - 1) // stride + 1


def output_shape(input: Tensor, channels: int, stride, padding) -> tuple[int, int, int, int]:
    N, _, H, W = input.shape
    return (N, channels, output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1]))


def channels_last(t: Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: Tensor) -> torch.memory_format:
    """The format an operator's output keeps: the input's."""
    return torch.channels_last if channels_last(t) else torch.contiguous_format


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_args(op: str, input: Tensor, shift: Tensor, stride, padding, grad: Tensor | None = None) -> None:
    """The active shift's operands (ext/active_shift.cpp, `check_args`/`prepare`)."""
    torch._check_with(ValueError, input.dim() == 4,
                      lambda: f"{op}: input must be 4-D (N, C, H, W), got {input.dim()}-D with shape {tuple(input.shape)}")
    C = input.shape[1]
    torch._check_with(ValueError, shift.dim() == 2 and shift.shape[0] == C and shift.shape[1] == 2,
                      lambda: f"{op}: shift must have shape (C, 2) = ({C}, 2) for an input with {C} channels, got {tuple(shift.shape)}")
    torch._check_with(ValueError, input.device == shift.device,
                      lambda: f"{op}: input and shift must be on the same device, got input on {input.device} and shift on {shift.device}")
    torch._check_with(TypeError, input.is_floating_point(), lambda: f"{op}: input must be a floating-point tensor, got {input.dtype}")
    torch._check_with(TypeError, shift.is_floating_point(), lambda: f"{op}: shift must be a floating-point tensor, got {shift.dtype}")
    torch._check_with(ValueError, len(stride) == 2 and min(stride) >= 1, lambda: f"{op}: stride must be two integers >= 1, got {list(stride)}")
    torch._check_with(ValueError, len(padding) == 2 and min(padding) >= 0, lambda: f"{op}: padding must be two integers >= 0, got {list(padding)}")
    if grad is not None:
        expected = output_shape(input, C, stride, padding)
        torch._check_with(ValueError, tuple(grad.shape) == expected,
                          lambda: f"{op}: grad_output must have shape {list(expected)}, got {list(grad.shape)}")
        torch._check_with(ValueError, grad.device == input.device, lambda: f"{op}: grad_output is on {grad.device} but input is on {input.device}")


def check_vector(op, input, t, name, n) -> None:
    """A per-channel vector of n values on the input's device and dtype (`check_vector`)."""
    torch._check_with(ValueError, t.dim() == 1 and t.shape[0] == n and t.device == input.device,
                      lambda: f"{op}: {name} must be ({n}) on {input.device}, got {tuple(t.shape)} on {t.device}")
    torch._check_with(TypeError, t.dtype == input.dtype, lambda: f"{op}: {name} dtype {t.dtype} differs from input dtype {input.dtype}")


def check_weight(op, input, C, weight, bias) -> int:
    """A 1x1 convolution's weight and optional bias (`check_weight`); returns C_out."""
    torch._check_with(ValueError, (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2] == 1 and weight.shape[3] == 1))
                      and weight.shape[1] == C,
                      lambda: f"{op}: weight must be (C_out, {C}) or (C_out, {C}, 1, 1), got {tuple(weight.shape)}")
    torch._check_with(TypeError, weight.dtype == input.dtype, lambda: f"{op}: weight dtype {weight.dtype} differs from input dtype {input.dtype}")
    torch._check_with(ValueError, weight.device == input.device, lambda: f"{op}: weight is on {weight.device} but input is on {input.device}")
    if bias is not None:
        check_vector(op, input, bias, "bias", weight.shape[0])
    return weight.shape[0]


def check_conv1x1(input, shift, weight, bias, residual, stride, padding) -> None:
    """shift_conv1x1's checks (ext/fused_ops.cpp, `check_conv1x1`)."""
    op = "shift_conv1x1"
    check_args(op, input, shift, stride, padding)
    Co = check_weight(op, input, input.shape[1], weight, bias)
    if residual is not None:
        expected = output_shape(input, Co, stride, padding)
        torch._check_with(ValueError, tuple(residual.shape) == expected and residual.device == input.device,
                          lambda: f"{op}: residual must have shape {list(expected)} on {input.device}, got {list(residual.shape)} on {residual.device}")
        torch._check_with(TypeError, residual.dtype == input.dtype, lambda: f"{op}: residual dtype {residual.dtype} differs from input dtype {input.dtype}")


def check_scale_bias(input, scale, bias) -> None:
    """scale_bias_relu's checks."""
    torch._check_with(ValueError, input.dim() == 4, lambda: f"scale_bias_relu: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    C = input.shape[1]
    torch._check_with(ValueError, scale.numel() == C and bias.numel() == C,
                      lambda: f"scale_bias_relu: scale and bias need {C} values, got {scale.numel()} and {bias.numel()}")


def check_pointwise(input, weight, bias, in_scale, in_bias) -> None:
    """conv1x1's checks (ext/fused_ops.cpp, `check_pointwise`)."""
    op = "conv1x1"
    torch._check_with(ValueError, input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    torch._check_with(TypeError, input.is_floating_point(), lambda: f"{op}: input must be a floating-point tensor, got {input.dtype}")
    C = input.shape[1]
    check_weight(op, input, C, weight, bias)
    torch._check_with(ValueError, (in_scale is None) == (in_bias is None), lambda: f"{op}: in_scale and in_bias go together")
    if in_scale is not None:
        check_vector(op, input, in_scale, "in_scale", C)
        check_vector(op, input, in_bias, "in_bias", C)


def check_batch_norm(op: str, input: Tensor, weight: Tensor, bias: Tensor, eps: float = 0.0) -> None:
    """batch_norm_relu's checks (ext/cpu/batch_norm_kernel.cpp, `check_training`)."""
    torch._check_with(ValueError, input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    torch._check_with(TypeError, input.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: input must be float32 or float64, got {input.dtype}")
    C = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias")):
        check_vector(op, input, t, name, C)
    torch._check_with(ValueError, eps >= 0, lambda: f"{op}: eps must be >= 0, got {eps}")
    torch._check_with(ValueError, input.numel() // max(C, 1) > 1,
                      lambda: f"{op}: expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}")


def check_batch_norm_backward(grad: Tensor, input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                              grad_residual: Tensor | None = None) -> None:
    """The backward kernel's checks: the forward's, grad_output's shape and device, the saved
    statistics ((C) in the accumulation dtype), and grad_residual's shape, device and dtype."""
    op = "batch_norm_relu_backward"
    check_batch_norm(op, input, weight, bias)
    torch._check_with(ValueError, grad.shape == input.shape and grad.device == input.device,
                      lambda: f"{op}: grad_output must have the input's shape {tuple(input.shape)} on {input.device}, "
                              f"got {tuple(grad.shape)} on {grad.device}")
    check_batch_norm_stats(op, input, mean, invstd)
    check_grad_residual(op, input, grad_residual)


def check_batch_norm_relu_shift(input: Tensor, weight: Tensor, bias: Tensor, eps: float, shift: Tensor, stride, padding,
                                grad: Tensor | None = None, mean: Tensor | None = None, invstd: Tensor | None = None) -> None:
    """batch_norm_relu_shift's checks (ext/cpu/active_shift_kernel.cpp), or with grad, mean and
    invstd its backward's: the BatchNorm's, the statistics', then the shift's and grad_output's."""
    op = "batch_norm_relu_shift" if grad is None else "batch_norm_relu_shift_backward"
    check_batch_norm(op, input, weight, bias, eps)
    if grad is not None:
        check_batch_norm_stats(op, input, mean, invstd)
    check_args(op, input, shift, stride, padding, grad)


def check_grad_residual(op: str, input: Tensor, grad_residual: Tensor | None) -> None:
    """A gradient reaching the input by another path, where given: the input's shape, device and dtype."""
    if grad_residual is None:
        return
    torch._check_with(ValueError, grad_residual.shape == input.shape and grad_residual.device == input.device,
                      lambda: f"{op}: grad_residual must have the input's shape {tuple(input.shape)} on {input.device}, "
                              f"got {tuple(grad_residual.shape)} on {grad_residual.device}")
    torch._check_with(TypeError, grad_residual.dtype == input.dtype,
                      lambda: f"{op}: grad_residual must be {input.dtype} as the input, got {grad_residual.dtype}")


def check_batch_norm_relu_conv(input: Tensor, weight: Tensor, bias: Tensor, eps: float, conv_weight: Tensor,
                               grad: Tensor | None = None, mean: Tensor | None = None, invstd: Tensor | None = None,
                               grad_residual: Tensor | None = None) -> None:
    """batch_norm_relu_conv1x1's checks (ext/cpu/batch_norm_relu_conv_kernel.cpp), or with grad,
    mean and invstd its backward's: the BatchNorm's, the 1x1 weight's, then the statistics',
    grad_output's and grad_residual's."""
    op = "batch_norm_relu_conv1x1" if grad is None else "batch_norm_relu_conv1x1_backward"
    check_batch_norm(op, input, weight, bias, eps)
    C = input.shape[1]
    torch._check_with(ValueError, conv_weight.dim() == 4 and conv_weight.shape[1:] == (C, 1, 1)
                      and conv_weight.device == input.device,
                      lambda: f"{op}: conv_weight must be (C_out, {C}, 1, 1) on {input.device}, "
                              f"got {tuple(conv_weight.shape)} on {conv_weight.device}")
    torch._check_with(TypeError, conv_weight.dtype == input.dtype,
                      lambda: f"{op}: conv_weight dtype {conv_weight.dtype} differs from input dtype {input.dtype}")
    if grad is None:
        return
    check_batch_norm_stats(op, input, mean, invstd)
    shape = (input.shape[0], conv_weight.shape[0], *input.shape[2:])
    torch._check_with(ValueError, grad.shape == shape and grad.device == input.device,
                      lambda: f"{op}: grad_output must be {shape} on {input.device}, got {tuple(grad.shape)} on {grad.device}")
    check_grad_residual(op, input, grad_residual)


def check_batch_norm_stats(op: str, input: Tensor, mean: Tensor, invstd: Tensor) -> None:
    """The saved statistics: (C) on the input's device, in its accumulation dtype."""
    C, acc = input.shape[1], accumulation_dtype(input.dtype)
    for t, name in ((mean, "mean"), (invstd, "invstd")):
        torch._check_with(ValueError, t.dim() == 1 and t.shape[0] == C and t.device == input.device,
                          lambda: f"{op}: {name} must be ({C}) on {input.device}, got {tuple(t.shape)} on {t.device}")
        torch._check_with(TypeError, t.dtype == acc, lambda: f"{op}: {name} must be {acc}, got {t.dtype}")
