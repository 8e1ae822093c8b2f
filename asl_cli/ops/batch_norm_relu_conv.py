"""A pre-activation block's BatchNorm-ReLU and the 1x1 convolution after it, in training, as one
operator: `torch.ops.asl.batch_norm_relu_conv1x1(input, weight, bias, eps, conv_weight)` is
conv2d(relu(batch_norm(input)), conv_weight) for a bias-free 1x1 weight at stride 1, with the
batch's statistics, returning (output, mean, invstd) like batch_norm_relu;
`batch_norm_relu_conv1x1_backward` gives (grad_input, grad_weight, grad_bias, grad_conv_weight),
with grad_residual (a gradient reaching the input by another path, the block's shortcut) added to
grad_input as it is written.

On the CPU, channels_last float32 with 16, 32, 48 or 64 channels in and out on AVX-512 machines,
the kernel (ext/cpu/batch_norm_relu_conv_kernel.cpp) multiplies relu(batch_norm(input)) in
registers, so it is never written or read back, and its backward computes the convolution's
input gradient a block of rows at a time in cache, where the BatchNorm's backward sums and the
convolution's weight gradient read it. Its products sum in another order than oneDNN's, so the
results equal the two operators' to float rounding, not bit for bit. Elsewhere, and on every other
device, the composition below. The layer that uses it is `asl_cli.nn.bn_relu_conv_skip`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import library  # noqa: F401  (the operators must be declared first)
from .batch_norm_relu import reference_batch_norm_relu
from .batch_norm_relu_shift import _bn_relu
from .checks import check_batch_norm_relu_conv, memory_format


def reference_batch_norm_relu_conv1x1(input: Tensor, weight: Tensor, bias: Tensor, eps: float,
                                      conv_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """conv2d(relu(batch_norm(input)), conv_weight) by the BatchNorm-ReLU reference and F.conv2d,
    and the (mean, invstd) it used. Differentiable by autograd."""
    check_batch_norm_relu_conv(input, weight, bias, eps, conv_weight)
    out, mean, invstd = reference_batch_norm_relu(input, weight, bias, eps)
    return F.conv2d(out, conv_weight).contiguous(memory_format=memory_format(input)), mean, invstd


def _composite(input, weight, bias, eps, conv_weight):
    check_batch_norm_relu_conv(input, weight, bias, eps, conv_weight)
    out, mean, invstd = torch.ops.asl.batch_norm_relu(input, weight, bias, eps)
    return F.conv2d(out, conv_weight).contiguous(memory_format=memory_format(input)), mean, invstd


def _composite_backward(grad, input, weight, bias, mean, invstd, conv_weight, grad_residual=None):
    check_batch_norm_relu_conv(input, weight, bias, 0.0, conv_weight, grad, mean, invstd, grad_residual)
    x = _bn_relu(input, weight, bias, mean, invstd)
    gx_conv, gcw, _ = torch.ops.aten.convolution_backward(grad, x, conv_weight, None, [1, 1], [0, 0], [1, 1], False,
                                                          [0, 0], 1, [True, True, False])
    gx, gw, gb = torch.ops.asl.batch_norm_relu_backward(gx_conv, input, weight, bias, mean, invstd, grad_residual)
    return gx, gw, gb, gcw


# The compiled CPU kernel takes precedence over this composite on the CPU.
_LIB = torch.library.Library("asl", "IMPL")
_LIB.impl("batch_norm_relu_conv1x1", _composite, "CompositeExplicitAutograd")
_LIB.impl("batch_norm_relu_conv1x1_backward", _composite_backward, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    input, weight, bias, _eps, conv_weight = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, mean, invstd, conv_weight)
    ctx.mark_non_differentiable(mean, invstd)


def _backward(ctx, grad, _grad_mean, _grad_invstd):
    input, weight, bias, mean, invstd, conv_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw, gb, gcw = torch.ops.asl.batch_norm_relu_conv1x1_backward(grad, input, weight, bias, mean, invstd, conv_weight)
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None,
            gcw if need[4] else None)


torch.library.register_autograd("asl::batch_norm_relu_conv1x1", _backward, setup_context=_setup_context)
