"""BatchNorm followed by ReLU in training, as one operator: `torch.ops.asl.batch_norm_relu`.

In a training step on the CPU, ATen's BatchNorm, ReLU and their backwards make about eight full
passes over each layer's activations and are bound by memory traffic (at CIFAR sizes they took 40%
of an ASNet step, more than the convolutions). The fused operator makes five (ext/cpu/
batch_norm_kernel.cpp) and keeps no mask: its backward recomputes the ReLU from the input.

`fuse_bn_relu(model)` turns every BatchNorm2d that a ReLU follows in an nn.Sequential into a
`BatchNormReLU2d` (same parameters, buffers and state-dict keys; the ReLU becomes an Identity),
which uses the operator in training on the CPU and is the plain pair everywhere else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops  # noqa: F401  (declares the asl library: schemas, compiled kernels)

__all__ = ["BatchNormReLU2d", "fuse_bn_relu", "reference_batch_norm_relu", "reference_batch_norm_relu_backward"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(op: str, input: Tensor, weight: Tensor, bias: Tensor, eps: float = 0.0) -> None:
    """The compiled kernels' checks (ext/cpu/batch_norm_kernel.cpp, `check_training`)."""
    torch._check_with(ValueError, input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    torch._check_with(TypeError, input.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: input must be float32 or float64, got {input.dtype}")
    C = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias")):
        ops._check_vector(op, input, t, name, C)
    torch._check_with(ValueError, eps >= 0, lambda: f"{op}: eps must be >= 0, got {eps}")
    torch._check_with(ValueError, input.numel() // max(C, 1) > 1,
                      lambda: f"{op}: expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}")


def _check_backward(grad: Tensor, input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> None:
    """The backward kernel's checks: the forward's, grad_output's shape and device, and the
    saved statistics ((C) in the accumulation dtype)."""
    op = "batch_norm_relu_backward"
    _check(op, input, weight, bias)
    torch._check_with(ValueError, grad.shape == input.shape and grad.device == input.device,
                      lambda: f"{op}: grad_output must have the input's shape {tuple(input.shape)} on {input.device}, "
                              f"got {tuple(grad.shape)} on {grad.device}")
    C, acc = input.shape[1], _acc_dtype(input.dtype)
    for t, name in ((mean, "mean"), (invstd, "invstd")):
        torch._check_with(ValueError, t.dim() == 1 and t.shape[0] == C and t.device == input.device,
                          lambda: f"{op}: {name} must be ({C}) on {input.device}, got {tuple(t.shape)} on {t.device}")
        torch._check_with(TypeError, t.dtype == acc, lambda: f"{op}: {name} must be {acc}, got {t.dtype}")


def _format(input: Tensor) -> torch.memory_format:
    return torch.channels_last if ops._channels_last(input) else torch.contiguous_format


def reference_batch_norm_relu(input: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """relu(batch_norm(input)) with the batch's statistics, and the (mean, invstd) it used."""
    _check("batch_norm_relu", input, weight, bias, eps)
    acc = _acc_dtype(input.dtype)
    var, mean = torch.var_mean(input.to(acc), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    out = torch.relu(F.batch_norm(input, None, None, weight, bias, True, 0.0, eps))
    return out.contiguous(memory_format=_format(input)), mean, invstd


def reference_batch_norm_relu_backward(grad: Tensor, input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                                       invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of reference_batch_norm_relu's output, by the formula."""
    _check_backward(grad, input, weight, bias, mean, invstd)
    acc = _acc_dtype(input.dtype)
    view = (1, -1, 1, 1)
    x, g = input.to(acc), grad.to(acc)
    xhat = (x - mean.view(view)) * invstd.view(view)
    gy = torch.where(xhat * weight.to(acc).view(view) + bias.to(acc).view(view) > 0, g, 0)
    s1, s2 = gy.sum((0, 2, 3)), (gy * xhat).sum((0, 2, 3))
    M = input.numel() // input.shape[1]
    gx = (weight.to(acc) * invstd).view(view) * (gy - (s1 / M).view(view) - xhat * (s2 / M).view(view))
    return gx.to(input.dtype).contiguous(memory_format=_format(input)), s2.to(weight.dtype), s1.to(bias.dtype)


# Devices without a kernel of their own (CUDA, and every device when the extension is missing)
# run the reference; the compiled CPU kernel takes precedence on the CPU.
_LIB = torch.library.Library("asl", "IMPL")
_LIB.impl("batch_norm_relu", reference_batch_norm_relu, "CompositeExplicitAutograd")
_LIB.impl("batch_norm_relu_backward", reference_batch_norm_relu_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("asl::batch_norm_relu")
def _fake(input, weight, bias, eps):
    _check("batch_norm_relu", input, weight, bias, eps)
    stats = input.new_empty((input.shape[1],), dtype=_acc_dtype(input.dtype))
    return torch.empty_like(input, memory_format=_format(input)), stats, torch.empty_like(stats)


@torch.library.register_fake("asl::batch_norm_relu_backward")
def _fake_backward(grad, input, weight, bias, mean, invstd):
    _check_backward(grad, input, weight, bias, mean, invstd)
    return torch.empty_like(input, memory_format=_format(input)), torch.empty_like(weight), torch.empty_like(bias)


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
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                M = x.numel() // x.shape[1]
                var = (invstd.pow(-2) - self.eps) * (M / max(M - 1, 1))  # unbiased, as nn.BatchNorm2d keeps it
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)
        return out


def fuse_bn_relu(model: nn.Module) -> int:
    """In place: each nn.BatchNorm2d directly followed by an nn.ReLU in an nn.Sequential becomes a
    BatchNormReLU2d (the same object, so parameters, buffers, hooks and state-dict keys stay) and
    the ReLU an nn.Identity. Returns how many pairs were fused."""
    count = 0
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
