"""Fake kernels for every `asl` operator: output shapes, dtypes and memory formats for
torch.compile and torch.export, after the same checks the real kernels make."""
from __future__ import annotations

import torch

from . import library  # noqa: F401  (the operators must be declared first)
from .checks import (accumulation_dtype, check_args, check_batch_norm, check_batch_norm_backward,
                     check_batch_norm_relu_conv, check_batch_norm_relu_shift, check_conv1x1, check_pointwise, check_scale_bias, memory_format,
                     output_shape)


@torch.library.register_fake("asl::active_shift")
def _active_shift(input, shift, stride, padding):
    check_args("active_shift", input, shift, stride, padding)
    shape = output_shape(input, input.shape[1], stride, padding)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format(input))


@torch.library.register_fake("asl::active_shift_grad_input")
def _grad_input(grad_output, input, shift, stride, padding):
    check_args("active_shift_grad_input", input, shift, stride, padding, grad_output)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format(input))


@torch.library.register_fake("asl::active_shift_grad_shift")
def _grad_shift(grad_output, input, shift, stride, padding):
    check_args("active_shift_grad_shift", input, shift, stride, padding, grad_output)
    return shift.new_empty(shift.shape)


@torch.library.register_fake("asl::active_shift_backward")
def _backward(grad_output, input, shift, stride, padding):
    return _grad_input(grad_output, input, shift, stride, padding), _grad_shift(grad_output, input, shift, stride, padding)


@torch.library.register_fake("asl::conv1x1")
def _conv1x1(input, weight, bias, in_scale, in_bias, relu):
    check_pointwise(input, weight, bias, in_scale, in_bias)
    N, _, H, W = input.shape
    return input.new_empty((N, weight.shape[0], H, W))


@torch.library.register_fake("asl::scale_bias_relu")
def _scale_bias_relu(input, scale, bias):
    check_scale_bias(input, scale, bias)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("asl::shift_conv1x1")
def _shift_conv1x1(input, shift, weight, bias, residual, stride, padding):
    check_conv1x1(input, shift, weight, bias, residual, stride, padding)
    return input.new_empty(output_shape(input, weight.shape[0], stride, padding))


@torch.library.register_fake("asl::batch_norm_relu")
def _batch_norm_relu(input, weight, bias, eps):
    check_batch_norm("batch_norm_relu", input, weight, bias, eps)
    stats = input.new_empty((input.shape[1],), dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(input, memory_format=memory_format(input)), stats, torch.empty_like(stats)


@torch.library.register_fake("asl::batch_norm_relu_backward")
def _batch_norm_relu_backward(grad, input, weight, bias, mean, invstd, grad_residual=None):
    check_batch_norm_backward(grad, input, weight, bias, mean, invstd, grad_residual)
    return torch.empty_like(input, memory_format=memory_format(input)), torch.empty_like(weight), torch.empty_like(bias)


@torch.library.register_fake("asl::batch_norm_relu_shift")
def _batch_norm_relu_shift(input, weight, bias, eps, shift, stride, padding):
    check_batch_norm_relu_shift(input, weight, bias, eps, shift, stride, padding)
    shape = output_shape(input, input.shape[1], stride, padding)
    stats = input.new_empty((input.shape[1],), dtype=accumulation_dtype(input.dtype))
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format(input))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("asl::batch_norm_relu_shift_backward")
def _batch_norm_relu_shift_backward(grad, input, weight, bias, mean, invstd, shift, stride, padding, shift_grad=True):
    check_batch_norm_relu_shift(input, weight, bias, 0.0, shift, stride, padding, grad, mean, invstd)
    return (torch.empty_like(input, memory_format=memory_format(input)), torch.empty_like(weight), torch.empty_like(bias),
            shift.new_empty(shift.shape) if shift_grad else None)


@torch.library.register_fake("asl::batch_norm_relu_conv1x1")
def _batch_norm_relu_conv1x1(input, weight, bias, eps, conv_weight):
    check_batch_norm_relu_conv(input, weight, bias, eps, conv_weight)
    shape = (input.shape[0], conv_weight.shape[0], *input.shape[2:])
    stats = input.new_empty((input.shape[1],), dtype=accumulation_dtype(input.dtype))
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format(input))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("asl::batch_norm_relu_conv1x1_backward")
def _batch_norm_relu_conv1x1_backward(grad, input, weight, bias, mean, invstd, conv_weight, grad_residual=None):
    check_batch_norm_relu_conv(input, weight, bias, 0.0, conv_weight, grad, mean, invstd, grad_residual)
    return (torch.empty_like(input, memory_format=memory_format(input)), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(conv_weight))
