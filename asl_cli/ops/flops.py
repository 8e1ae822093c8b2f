"""FLOP formulas for torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add, its
convention): 4 multiply-adds per output element forward, as counted in the paper; 4 per input
element for the input gradient and 8 per output element for the two shift-gradient sums."""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import library  # noqa: F401  (the operators must be declared first)


def _numel(shape) -> int:
    return math.prod(shape)


@register_flop_formula(torch.ops.asl.active_shift)
def _flops_forward(input_shape, shift_shape, stride, padding, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(out_shape)


@register_flop_formula(torch.ops.asl.active_shift_grad_input)
def _flops_grad_input(grad_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(input_shape)


@register_flop_formula(torch.ops.asl.active_shift_grad_shift)
def _flops_grad_shift(grad_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 8 * _numel(grad_shape)


@register_flop_formula(torch.ops.asl.shift_conv1x1)
def _flops_shift_conv1x1(input_shape, shift_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    N, Co, Ho, Wo = out_shape
    return 2 * 4 * N * input_shape[1] * Ho * Wo + 2 * N * Ho * Wo * Co * weight_shape[1]


@register_flop_formula(torch.ops.asl.conv1x1)
def _flops_conv1x1(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    N, Co, H, W = out_shape
    return 2 * N * H * W * Co * weight_shape[1]


@register_flop_formula(torch.ops.asl.active_shift_backward)
def _flops_backward(grad_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(input_shape) + 2 * 8 * _numel(grad_shape)


@register_flop_formula(torch.ops.asl.batch_norm_relu_conv1x1)
def _flops_batch_norm_relu_conv1x1(input_shape, weight_shape, bias_shape, eps, conv_weight_shape, *args, out_shape=None,
                                   **kwargs) -> int:
    """The convolution's multiply-adds (the BatchNorm-ReLU's, like ATen's batch norm, are not counted)."""
    N, C, H, W = input_shape
    return 2 * N * H * W * C * conv_weight_shape[0]


@register_flop_formula(torch.ops.asl.batch_norm_relu_conv1x1_backward)
def _flops_batch_norm_relu_conv1x1_backward(grad_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    """The convolution's input and weight gradients."""
    N, Co, H, W = grad_shape
    return 2 * 2 * N * H * W * Co * input_shape[1]
