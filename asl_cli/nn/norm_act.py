"""Normalisation followed by activation as one layer: `BatchNormReLU2d` uses the fused
`torch.ops.asl.batch_norm_relu` in training on the CPU (five passes over the activations instead
of about eight, no ReLU mask kept) and is the plain pair everywhere else.

`fuse_bn_relu(model)` turns every BatchNorm2d that a ReLU follows in an nn.Sequential into a
`BatchNormReLU2d` (same parameters, buffers and state-dict keys; the ReLU becomes an Identity),
and has every `ResidualConv2d` add its residual in the convolution's own call.
`bn_relu_shift(norm, shift, x)` runs such a layer and the ActiveShift2d after it as one
`batch_norm_relu_shift` call where that is fused; `bn_relu_skip(norm, x)` runs it on a residual
block's input, whose gradient from the shortcut its backward then adds as it writes its own, and
`bn_relu_conv_skip(norm, conv, x)` the same followed by the block's first 1x1 convolution, as one
`batch_norm_relu_conv1x1` call where that is fused.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  (registers torch.ops.asl.batch_norm_relu)
from ..ops.checks import memory_format
from .residual import ResidualConv2d
from .shift import ActiveShift2d

__all__ = ["BatchNormReLU2d", "bn_relu_conv_skip", "bn_relu_shift", "bn_relu_skip", "fuse_bn_relu"]


class BatchNormReLU2d(nn.BatchNorm2d):
    """relu(BatchNorm2d(x)). In training on the CPU (float32/64, affine, 4-D input) one
    `batch_norm_relu` call with the running statistics updated as nn.BatchNorm2d does; otherwise
    (evaluation, other devices, forward-mode AD, torch.func transforms) the plain pair."""

    def _fused(self, x: Tensor) -> bool:
        return (self.training and self.affine and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype
                and not torch._C._are_functorch_transforms_active()
                and torch.autograd.forward_ad.unpack_dual(x).tangent is None)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fused(x):
            return torch.relu(super().forward(x))
        out, mean, invstd = torch.ops.asl.batch_norm_relu(x, self.weight, self.bias, self.eps)
        self._track(x, mean, invstd)
        return out

    def _track(self, x: Tensor, mean: Tensor, invstd: Tensor) -> None:
        """The running statistics' update from a fused call's batch statistics, as nn.BatchNorm2d's."""
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                M = x.numel() // x.shape[1]
                var = (invstd.pow(-2) - self.eps) * (M / max(M - 1, 1))  # unbiased, as nn.BatchNorm2d keeps it
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)


def _as_bn_relu(norm: nn.Module) -> nn.Module:
    """A BatchNormReLU2d alone, or followed by the Identity fuse_bn_relu leaves: the BatchNormReLU2d."""
    if isinstance(norm, nn.Sequential) and len(norm) == 2 and isinstance(norm[1], nn.Identity):
        return norm[0]
    return norm


class _BatchNormReLUSkip(torch.autograd.Function):
    """(relu(batch_norm(x)), x, mean, invstd): the input passed on as a second output, so that the
    gradient reaching it that way (a residual shortcut) is added by batch_norm_relu_backward as it
    writes grad_input, not by autograd in a pass over the input of its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, invstd = torch.ops.asl.batch_norm_relu(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return out, x, mean, invstd

    @staticmethod
    def backward(ctx, grad, grad_skip, _grad_mean, _grad_invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.asl.batch_norm_relu_backward(grad, x, weight, bias, mean, invstd, grad_skip)
        need = ctx.needs_input_grad
        return gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None


def bn_relu_skip(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(x), x) for a residual block whose input x also goes to its shortcut. Where norm is a
    BatchNormReLU2d (alone or as fuse_bn_relu leaves it) on its fused path, one autograd node: the
    gradient that reaches x through the returned x is added in the BatchNorm-ReLU backward's last
    pass, the same bits as autograd's sum. Otherwise norm(x) and x itself."""
    bn = _as_bn_relu(norm)
    if not (isinstance(bn, BatchNormReLU2d) and bn._fused(x)) or torch.compiler.is_compiling():
        return norm(x), x
    out, skip, mean, invstd = _BatchNormReLUSkip.apply(x, bn.weight, bn.bias, bn.eps)
    bn._track(x, mean, invstd)
    return out, skip


class _BatchNormReLUConvSkip(torch.autograd.Function):
    """(conv1x1(relu(batch_norm(x))), x, mean, invstd) by batch_norm_relu_conv1x1: x passed on as
    a second output, as in _BatchNormReLUSkip, so that its gradient from the shortcut is added in
    the backward's last pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, conv_weight):
        out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, weight, bias, eps, conv_weight)
        ctx.save_for_backward(x, weight, bias, mean, invstd, conv_weight)
        ctx.mark_non_differentiable(mean, invstd)
        return out, x, mean, invstd

    @staticmethod
    def backward(ctx, grad, grad_skip, _grad_mean, _grad_invstd):
        x, weight, bias, mean, invstd, conv_weight = ctx.saved_tensors
        gx, gw, gb, gcw = torch.ops.asl.batch_norm_relu_conv1x1_backward(grad, x, weight, bias, mean, invstd,
                                                                         conv_weight, grad_skip)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None,
                gcw if need[4] else None)


def _conv_fusable(conv: nn.Module, x: Tensor) -> bool:
    """Whether conv(x) is what batch_norm_relu_conv1x1's fast CPU kernel computes: a bias-free 1x1
    nn.Conv2d at stride 1 on a channels_last float32 x, 16 to 64 channels (multiples of 16) in
    and out."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
            and conv.weight.dtype == x.dtype == torch.float32 and conv.weight.device == x.device
            and memory_format(x) == torch.channels_last
            and all(c % 16 == 0 and 16 <= c <= 64 for c in (conv.in_channels, conv.out_channels)))


def bn_relu_conv_skip(norm: nn.Module, conv: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(conv(norm(x)), x) for a pre-activation block whose input x also goes to its shortcut. Where
    norm is a BatchNormReLU2d on its fused path and conv a 1x1 convolution that the fused kernel
    serves (see _conv_fusable), one `batch_norm_relu_conv1x1` call (norm(x) is never written) whose
    backward also adds x's gradient from the shortcut; the results equal the plain path's to float
    rounding. Otherwise bn_relu_skip, then conv."""
    bn = _as_bn_relu(norm)
    if (isinstance(bn, BatchNormReLU2d) and bn._fused(x) and _conv_fusable(conv, x)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        out, skip, mean, invstd = _BatchNormReLUConvSkip.apply(x, bn.weight, bn.bias, bn.eps, conv.weight)
        bn._track(x, mean, invstd)
        return out, skip
    pre, skip = bn_relu_skip(norm, x)
    return conv(pre), skip


def bn_relu_shift(norm: nn.Module, shift: nn.Module, x: Tensor) -> Tensor:
    """shift(norm(x)): one `batch_norm_relu_shift` call when norm is a BatchNormReLU2d (alone, or
    followed by an Identity in an nn.Sequential, as fuse_bn_relu leaves it) that takes its fused
    path and shift an ActiveShift2d; otherwise the two modules in turn. The same parameters,
    running statistics and result either way; fused, relu(norm(x)) is neither written nor kept
    for the backward (on the CPU in channels_last with shifts within a pixel or a pixel or so past
    one)."""
    bn = _as_bn_relu(norm)
    if not (isinstance(bn, BatchNormReLU2d) and type(shift) is ActiveShift2d and bn._fused(x)
            and shift.shift.device == x.device):
        return shift(norm(x))
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, bn.weight, bn.bias, bn.eps, shift.shift,
                                                            list(shift.stride), list(shift.padding))
    bn._track(x, mean, invstd)
    return out


def fuse_bn_relu(model: nn.Module) -> int:
    """In place: each nn.BatchNorm2d directly followed by an nn.ReLU in an nn.Sequential becomes a
    BatchNormReLU2d (the same object, so parameters, buffers, hooks and state-dict keys stay) and
    the ReLU an nn.Identity; each ResidualConv2d gets `fuse_add` (its addition in the
    convolution's call where it can be). Returns how many BatchNorm-ReLU pairs were fused."""
    count = 0
    for m in model.modules():
        if isinstance(m, ResidualConv2d):
            m.fuse_add = True
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            bn, relu = seq._modules[a], seq._modules[b]
            if type(bn) is nn.BatchNorm2d and type(relu) is nn.ReLU:
                bn.__class__ = BatchNormReLU2d
                seq._modules[b] = nn.Identity()
                count += 1
    return count
