"""BatchNorm followed by ReLU in training as one operator, `torch.ops.asl.batch_norm_relu`, with its
backward `batch_norm_relu_backward`: the reference (which serves every device without a compiled
kernel: CUDA, and all of them when the extension is missing) and the autograd formula.

In a training step on the CPU, ATen's BatchNorm, ReLU and their backwards make about eight full
passes over each layer's activations and are bound by memory traffic (at CIFAR sizes they took 40%
of an ASNet step, more than the convolutions). The fused kernel makes five (ext/cpu/
batch_norm_kernel.cpp) and keeps no mask: its backward recomputes the ReLU from the input. The
layer that uses it is `asl_cli.nn.BatchNormReLU2d`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import library  # noqa: F401  (the operators must be declared first)
from .checks import accumulation_dtype, check_batch_norm, check_batch_norm_backward, memory_format


def reference_batch_norm_relu(input: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """relu(batch_norm(input)) with the batch's statistics, and the (mean, invstd) it used."""
    check_batch_norm("batch_norm_relu", input, weight, bias, eps)
    acc = accumulation_dtype(input.dtype)
    var, mean = torch.var_mean(input.to(acc), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    out = torch.relu(F.batch_norm(input, None, None, weight, bias, True, 0.0, eps))
    return out.contiguous(memory_format=memory_format(input)), mean, invstd


def reference_batch_norm_relu_backward(grad: Tensor, input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                       invstd: Tensor, grad_residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of reference_batch_norm_relu's output, by the formula;
    grad_residual (a gradient reaching the input by another path) is added to grad_input."""
    check_batch_norm_backward(grad, input, weight, bias, mean, invstd, grad_residual)
    acc = accumulation_dtype(input.dtype)
    view = (1, -1, 1, 1)
    x, g = input.to(acc), grad.to(acc)
    xhat = (x - mean.view(view)) * invstd.view(view)
    gy = torch.where(xhat * weight.to(acc).view(view) + bias.to(acc).view(view) > 0, g, 0)
    s1, s2 = gy.sum((0, 2, 3)), (gy * xhat).sum((0, 2, 3))
    M = input.numel() // input.shape[1]
    gx = (weight.to(acc) * invstd).view(view) * (gy - (s1 / M).view(view) - xhat * (s2 / M).view(view))
    gx = gx.to(input.dtype)
    if grad_residual is not None:
        gx = gx + grad_residual
    return gx.contiguous(memory_format=memory_format(input)), s2.to(weight.dtype), s1.to(bias.dtype)


# The compiled CPU kernel takes precedence over this composite on the CPU.
_LIB = torch.library.Library("asl", "IMPL")
_LIB.impl("batch_norm_relu", reference_batch_norm_relu, "CompositeExplicitAutograd")
_LIB.impl("batch_norm_relu_backward", reference_batch_norm_relu_backward, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    input, weight, bias, _eps = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd)


def _backward(ctx, grad, _grad_mean, _grad_invstd):
    input, weight, bias, mean, invstd = ctx.saved_tensors
    gx, gw, gb = torch.ops.asl.batch_norm_relu_backward(grad, input, weight, bias, mean, invstd)
    return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            gb if ctx.needs_input_grad[2] else None, None)


torch.library.register_autograd("asl::batch_norm_relu", _backward, setup_context=_setup_context)
