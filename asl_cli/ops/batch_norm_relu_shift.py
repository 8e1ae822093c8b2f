"""A block's BatchNorm-ReLU and the active shift that follows it, in training, as one operator:
`torch.ops.asl.batch_norm_relu_shift(input, weight, bias, eps, shift, stride, padding)` is
active_shift(relu(batch_norm(input))) with the batch's statistics, returning (output, mean,
invstd) like batch_norm_relu; `batch_norm_relu_shift_backward` gives (grad_input, grad_weight,
grad_bias, grad_shift), grad_shift None with shift_grad=False (fixed shifts: GS, SI, SR), which
then is not computed.

On the CPU, channels_last with shifts within a pixel or a pixel or so past one (at most four
integer offsets per axis in each vector of channels, three for the backward at stride 2) at stride
1 or 2, the kernel (ext/cpu/active_shift_kernel.cpp) applies the BatchNorm and its ReLU to each
pixel as the shift reads it, so relu(batch_norm(input)) is never written, kept for the backward or
read back; the backward recomputes it the same way and sums the BatchNorm's backward sums while
the shift's input gradient is in cache. Elsewhere, and on every other device, the composition below: the two
operators in turn, the backward recomputing relu(batch_norm(input)) first. The layer that uses it
is `asl_cli.nn.bn_relu_shift` (each ASL block's BN-ReLU and shift).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import library  # noqa: F401  (the operators must be declared first)
from .batch_norm_relu import reference_batch_norm_relu
from .checks import accumulation_dtype, check_batch_norm_relu_shift, memory_format
from .reference import reference_active_shift


def reference_batch_norm_relu_shift(input: Tensor, weight: Tensor, bias: Tensor, eps: float, shift: Tensor, stride,
                                    padding) -> tuple[Tensor, Tensor, Tensor]:
    """active_shift(relu(batch_norm(input))) by the references of the two operators, and the
    (mean, invstd) it used. Differentiable by autograd."""
    check_batch_norm_relu_shift(input, weight, bias, eps, shift, stride, padding)
    out, mean, invstd = reference_batch_norm_relu(input, weight, bias, eps)
    out = reference_active_shift(out, shift, stride, padding)
    return out.contiguous(memory_format=memory_format(input)), mean, invstd


def _bn_relu(input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """relu(batch_norm(input)) with given statistics."""
    acc, view = accumulation_dtype(input.dtype), (1, -1, 1, 1)
    a = weight.to(acc) * invstd
    b = bias.to(acc) - mean * a
    return torch.relu(input * a.to(input.dtype).view(view) + b.to(input.dtype).view(view))


def _composite(input, weight, bias, eps, shift, stride, padding):
    check_batch_norm_relu_shift(input, weight, bias, eps, shift, stride, padding)
    out, mean, invstd = torch.ops.asl.batch_norm_relu(input, weight, bias, eps)
    return torch.ops.asl.active_shift(out, shift, stride, padding), mean, invstd


def _composite_backward(grad, input, weight, bias, mean, invstd, shift, stride, padding, shift_grad=True):
    check_batch_norm_relu_shift(input, weight, bias, 0.0, shift, stride, padding, grad, mean, invstd)
    x = _bn_relu(input, weight, bias, mean, invstd)
    if shift_grad:
        ga, gs = torch.ops.asl.active_shift_backward(grad, x, shift, stride, padding)
    else:
        ga, gs = torch.ops.asl.active_shift_grad_input(grad, x, shift, stride, padding), None
    gx, gw, gb = torch.ops.asl.batch_norm_relu_backward(ga, input, weight, bias, mean, invstd)
    return gx, gw, gb, gs


# The compiled CPU kernel takes precedence over this composite on the CPU.
_LIB = torch.library.Library("asl", "IMPL")
_LIB.impl("batch_norm_relu_shift", _composite, "CompositeExplicitAutograd")
_LIB.impl("batch_norm_relu_shift_backward", _composite_backward, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    input, weight, bias, _eps, shift, stride, padding = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, mean, invstd, shift)
    ctx.stride, ctx.padding = list(stride), list(padding)
    ctx.mark_non_differentiable(mean, invstd)


def _backward(ctx, grad, _grad_mean, _grad_invstd):
    input, weight, bias, mean, invstd, shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw, gb, gs = torch.ops.asl.batch_norm_relu_shift_backward(grad, input, weight, bias, mean, invstd, shift,
                                                                   ctx.stride, ctx.padding, need[4])
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None,
            gs if need[4] else None, None, None)


torch.library.register_autograd("asl::batch_norm_relu_shift", _backward, setup_context=_setup_context)
