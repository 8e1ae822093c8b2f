"""The last convolution of a residual block with the block's addition: `ResidualConv2d(x, residual)`
is conv(x) + residual. Where `fuse_bn_relu` has switched it on (`fuse_add`), on the CPU in float32
it is one oneDNN convolution with the addition as its post-op: the convolution's output is not
written and read back by a separate addition (a pass over the block's output less in each step),
and the bits are those of the plain pair. Everywhere else, and under tracing, export or
torch.compile, it is the plain pair.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.checks import memory_format

__all__ = ["ResidualConv2d"]


def _fused_conv_add():
    """oneDNN's convolution with a binary post-op, where this build of PyTorch has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    return getattr(op, "binary", None) if op is not None else None


_CONV_ADD = _fused_conv_add()


class _ConvAdd(torch.autograd.Function):
    """conv2d(x, weight, bias) + residual in one call; the backward is the convolution's own
    (aten::convolution_backward, as autograd runs it for the pair) and the residual's gradient
    passed through."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups, None if bias is None else list(bias.shape))
        return _CONV_ADD(x, residual, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_sizes = ctx.conv
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups,
            [need[0], need[1], bias_sizes is not None and need[2]])
        return gx, gw, gb, grad if need[3] else None, None, None, None, None


class ResidualConv2d(nn.Conv2d):
    """nn.Conv2d whose forward also takes the residual to add: forward(x, residual=None). The
    same parameters and state-dict keys as nn.Conv2d; `fuse_add` (off unless fuse_bn_relu turns it
    on) makes the sum one oneDNN call where it can be (see the module's docstring)."""

    fuse_add = False

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return super().forward(x)
        if self.fuse_add and self._fusable(x, residual):
            return _ConvAdd.apply(x, self.weight, self.bias, residual, list(self.stride), list(self.padding),
                                  list(self.dilation), self.groups)
        return super().forward(x) + residual

    def _fusable(self, x: Tensor, residual: Tensor) -> bool:
        if (_CONV_ADD is None or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active()):
            return False
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4:
            return False
        if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, residual, self.weight)):
            return False
        if any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in (x, residual)):
            return False
        # the post-op reads the residual as the output is laid out: the same shape and layout
        fmt = memory_format(x)
        shape = [x.shape[0], self.out_channels] + [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (list(residual.shape) == shape and all(t.is_contiguous(memory_format=fmt) for t in (x, residual, self.weight)))
