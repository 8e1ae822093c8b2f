"""The active shift operator's Python face.

`torch.ops.asl.active_shift(input, shift, stride, padding)` samples every channel c of an
(N, C, H, W) input bilinearly at (row, col) = (i*sh - ph + beta_c, j*sw - pw + alpha_c), with zeros
outside the image; `shift` is (C, 2) = (alpha, beta). This module registers its autograd formula
(two backward operators), fake kernels for `torch.compile`, and a FLOP formula for
`torch.utils.flop_counter`; it also holds the pure-PyTorch reference and the backend report.

Non-finite shifts are not an error: the channels they belong to come out as NaN (as do their
gradients), so one bad value is visible without a device synchronisation on every call.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["active_shift", "shift_conv1x1", "reference_active_shift", "backends", "output_size", "grid_sample_shift"]

IntPair = Union[int, Sequence[int]]
_OPS = ("active_shift", "active_shift_grad_input", "active_shift_grad_shift")
# The schemas are declared by the compiled library (ext/ops.cpp, TORCH_LIBRARY); these
# copies serve only when it cannot be loaded, and a test checks that they are identical.
_ARGS = "Tensor input, Tensor shift, int[2] stride, int[2] padding"
FALLBACK_SCHEMAS = {
    "active_shift": f"active_shift({_ARGS}) -> Tensor",
    "active_shift_grad_input": f"active_shift_grad_input(Tensor grad_output, {_ARGS}) -> Tensor",
    "active_shift_grad_shift": f"active_shift_grad_shift(Tensor grad_output, {_ARGS}) -> Tensor",
    "active_shift_backward": f"active_shift_backward(Tensor grad_output, {_ARGS}) -> (Tensor, Tensor)",
    "shift_conv1x1": ("shift_conv1x1(Tensor input, Tensor shift, Tensor weight, Tensor? bias, Tensor? residual, "
                      "int[2] stride, int[2] padding) -> Tensor"),
    "scale_bias_relu": "scale_bias_relu(Tensor input, Tensor scale, Tensor bias) -> Tensor",
    "conv1x1": "conv1x1(Tensor input, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_bias, bool relu) -> Tensor",
    "batch_norm_relu": "batch_norm_relu(Tensor input, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
    "batch_norm_relu_backward": ("batch_norm_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor bias, "
                                 "Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)"),
}

_EXT_ERROR: Exception | None = None
if os.environ.get("ASL_DISABLE_EXTENSION") == "1":
    _EXT_ERROR = ImportError("disabled by ASL_DISABLE_EXTENSION=1")
else:
    try:
        from . import _C  # noqa: F401  (loading it registers the compiled kernels)
    except Exception as e:  # ImportError, or OSError for a library it cannot find
        _EXT_ERROR = e


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (differentiable through autograd): the specification the kernels meet.
# ----------------------------------------------------------------------------------------------
def _pair(v: IntPair, name: str) -> tuple[int, int]:
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


def _shift_limit(H, W, Ho, Wo, stride, padding) -> float:
    # Beyond this |shift| every tap lies outside the image; clamping keeps indices small.
    return float(max(H + Ho * stride[0] + padding[0], W + Wo * stride[1] + padding[1]) + 4)


def reference_active_shift(input: Tensor, shift: Tensor, stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """Direct transcription of the operator's formula in PyTorch ops (slow, differentiable)."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    N, C, H, W = input.shape
    Ho, Wo = output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1])
    if N * C * Ho * Wo == 0:
        return input.new_zeros((N, C, Ho, Wo))
    ctype = torch.promote_types(input.dtype, torch.float32)
    x = input.to(ctype)
    s = shift.to(ctype)
    finite = torch.isfinite(s).all(dim=1)
    lim = _shift_limit(H, W, Ho, Wo, stride, padding)
    s = torch.where(finite[:, None], s, torch.zeros_like(s)).clamp(-lim, lim)
    alpha, beta = s[:, 0], s[:, 1]
    fl_a, fl_b = torch.floor(alpha).detach(), torch.floor(beta).detach()
    fc, fr = alpha - fl_a, beta - fl_b  # the shift gradient flows through the fractions
    dev = input.device
    r0 = (torch.arange(Ho, device=dev) * stride[0] - padding[0])[None, :] + fl_b.long()[:, None]  # (C, Ho)
    c0 = (torch.arange(Wo, device=dev) * stride[1] - padding[1])[None, :] + fl_a.long()[:, None]  # (C, Wo)
    flat = x.reshape(N, C, H * W)

    def tap(r: Tensor, c: Tensor) -> Tensor:
        valid = ((r >= 0) & (r < H))[:, :, None] & ((c >= 0) & (c < W))[:, None, :]
        idx = r.clamp(0, H - 1)[:, :, None] * W + c.clamp(0, W - 1)[:, None, :]
        v = flat.gather(2, idx.reshape(1, C, Ho * Wo).expand(N, C, Ho * Wo)).reshape(N, C, Ho, Wo)
        return torch.where(valid[None], v, torch.zeros((), dtype=ctype, device=dev))

    fr4, fc4 = fr[None, :, None, None], fc[None, :, None, None]
    out = (1 - fr4) * ((1 - fc4) * tap(r0, c0) + fc4 * tap(r0, c0 + 1)) + fr4 * (
        (1 - fc4) * tap(r0 + 1, c0) + fc4 * tap(r0 + 1, c0 + 1)
    )
    out = torch.where(finite[None, :, None, None], out, torch.full((), math.nan, dtype=ctype, device=dev))
    return out.to(input.dtype)


def grid_sample_shift(input: Tensor, shift: Tensor, stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """The same layer written with F.grid_sample: the obvious pure-PyTorch way, used as a peer."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    N, C, H, W = input.shape
    Ho, Wo = output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1])
    s = shift.to(input.dtype)
    rows = torch.arange(Ho, device=input.device, dtype=input.dtype) * stride[0] - padding[0]
    cols = torch.arange(Wo, device=input.device, dtype=input.dtype) * stride[1] - padding[1]
    gy = (rows[None, :] + s[:, 1:2]) * (2.0 / max(H - 1, 1)) - 1  # (C, Ho), align_corners=True
    gx = (cols[None, :] + s[:, 0:1]) * (2.0 / max(W - 1, 1)) - 1  # (C, Wo)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (C, Ho, Wo, 2)
    grid = grid[None].expand(N, C, Ho, Wo, 2).reshape(N * C, Ho, Wo, 2)
    out = F.grid_sample(input.reshape(N * C, 1, H, W), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(N, C, Ho, Wo)


def _reference_grads(grad, input, shift, stride, padding, wrt: str) -> Tensor:
    with torch.enable_grad():
        x = input.detach().requires_grad_(wrt == "input")
        s = shift.detach().requires_grad_(wrt == "shift")
        out = reference_active_shift(x, s, tuple(stride), tuple(padding))
        (g,) = torch.autograd.grad(out, x if wrt == "input" else s, grad.to(out.dtype))
    if wrt == "input":
        fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
        return g.contiguous(memory_format=fmt)
    return g.to(shift.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Registration: schemas come from the extension; without it they are declared here and served
# by the reference, so the rest of the package works the same either way.
# ----------------------------------------------------------------------------------------------
def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"asl::{op}", key)
    except RuntimeError:
        return False


def _channels_last(t: Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


_LIB = None
if not hasattr(torch.ops.asl, "active_shift"):
    _LIB = torch.library.Library("asl", "DEF")
    for _schema in FALLBACK_SCHEMAS.values():
        _LIB.define(_schema)

    def _backward_composite(grad, input, shift, stride, padding):
        return (torch.ops.asl.active_shift_grad_input(grad, input, shift, stride, padding),
                torch.ops.asl.active_shift_grad_shift(grad, input, shift, stride, padding))

    _LIB.impl("active_shift_backward", _backward_composite, "CompositeExplicitAutograd")

    def _shift_conv1x1_composite(input, shift, weight, bias, residual, stride, padding):
        _check_conv1x1(input, shift, weight, bias, residual, stride, padding)
        out = F.conv2d(torch.ops.asl.active_shift(input, shift, stride, padding), weight.reshape(weight.shape[0], -1, 1, 1), bias)
        return out + residual if residual is not None else out

    _LIB.impl("shift_conv1x1", _shift_conv1x1_composite, "CompositeExplicitAutograd")

    def _scale_bias_relu_composite(input, scale, bias):
        _check_scale_bias(input, scale, bias)
        return torch.relu(input * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1))

    _LIB.impl("scale_bias_relu", _scale_bias_relu_composite, "CompositeExplicitAutograd")

    def _conv1x1_composite(input, weight, bias, in_scale, in_bias, relu):
        _check_pointwise(input, weight, bias, in_scale, in_bias)
        if in_scale is not None:
            input = torch.relu(input * in_scale.reshape(1, -1, 1, 1) + in_bias.reshape(1, -1, 1, 1))
        out = F.conv2d(input, weight.reshape(weight.shape[0], -1, 1, 1), bias)
        return torch.relu(out) if relu else out

    _LIB.impl("conv1x1", _conv1x1_composite, "CompositeExplicitAutograd")


def _check_args(op: str, input: Tensor, shift: Tensor, stride, padding, grad: Tensor | None = None) -> None:
    """The compiled kernels' argument checks (ext/active_shift.cpp, `check_args`/`prepare`), for the
    fake kernels that torch.compile traces with and for the reference fallback: same rules, same
    exception types (ValueError, TypeError)."""
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
        N, _, H, W = input.shape
        expected = (N, C, output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1]))
        torch._check_with(ValueError, tuple(grad.shape) == expected,
                          lambda: f"{op}: grad_output must have shape {list(expected)}, got {list(grad.shape)}")
        torch._check_with(ValueError, grad.device == input.device, lambda: f"{op}: grad_output is on {grad.device} but input is on {input.device}")


def _check_vector(op, input, t, name, n) -> None:
    """A per-channel vector of n values on the input's device and dtype (`check_vector`)."""
    torch._check_with(ValueError, t.dim() == 1 and t.shape[0] == n and t.device == input.device,
                      lambda: f"{op}: {name} must be ({n}) on {input.device}, got {tuple(t.shape)} on {t.device}")
    torch._check_with(TypeError, t.dtype == input.dtype, lambda: f"{op}: {name} dtype {t.dtype} differs from input dtype {input.dtype}")


def _check_weight(op, input, C, weight, bias) -> int:
    """A 1x1 convolution's weight and optional bias (`check_weight`); returns C_out."""
    torch._check_with(ValueError, (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2] == 1 and weight.shape[3] == 1))
                      and weight.shape[1] == C,
                      lambda: f"{op}: weight must be (C_out, {C}) or (C_out, {C}, 1, 1), got {tuple(weight.shape)}")
    torch._check_with(TypeError, weight.dtype == input.dtype, lambda: f"{op}: weight dtype {weight.dtype} differs from input dtype {input.dtype}")
    torch._check_with(ValueError, weight.device == input.device, lambda: f"{op}: weight is on {weight.device} but input is on {input.device}")
    if bias is not None:
        _check_vector(op, input, bias, "bias", weight.shape[0])
    return weight.shape[0]


def _check_conv1x1(input, shift, weight, bias, residual, stride, padding) -> None:
    """shift_conv1x1's checks (ext/fused_ops.cpp, `check_conv1x1`)."""
    op = "shift_conv1x1"
    _check_args(op, input, shift, stride, padding)
    Co = _check_weight(op, input, input.shape[1], weight, bias)
    if residual is not None:
        N, _, H, W = input.shape
        expected = (N, Co, output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1]))
        torch._check_with(ValueError, tuple(residual.shape) == expected and residual.device == input.device,
                          lambda: f"{op}: residual must have shape {list(expected)} on {input.device}, got {list(residual.shape)} on {residual.device}")
        torch._check_with(TypeError, residual.dtype == input.dtype, lambda: f"{op}: residual dtype {residual.dtype} differs from input dtype {input.dtype}")


def _ref_forward(input, shift, stride, padding):
    _check_args("active_shift", input, shift, stride, padding)
    out = reference_active_shift(input, shift, tuple(stride), tuple(padding))
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def _ref_grad_input(grad, input, shift, stride, padding):
    _check_args("active_shift_grad_input", input, shift, stride, padding, grad)
    return _reference_grads(grad, input, shift, stride, padding, "input")


def _ref_grad_shift(grad, input, shift, stride, padding):
    _check_args("active_shift_grad_shift", input, shift, stride, padding, grad)
    return _reference_grads(grad, input, shift, stride, padding, "shift")


_REFERENCE_KERNELS = dict(zip(_OPS, (_ref_forward, _ref_grad_input, _ref_grad_shift)))
_FALLBACK_LIB = torch.library.Library("asl", "IMPL")
_BACKEND: dict[str, str] = {}
for _key, _compiled in (("CPU", "compiled C++"), ("CUDA", "compiled CUDA")):
    if all(_has_kernel(op, _key) for op in _OPS):
        _BACKEND[_key.lower()] = _compiled
    else:
        for _op, _fn in _REFERENCE_KERNELS.items():
            _FALLBACK_LIB.impl(_op, _fn, _key)
        _BACKEND[_key.lower()] = "pure-PyTorch reference"

if _EXT_ERROR is not None:
    warnings.warn(
        f"asl: the compiled extension could not be loaded ({_EXT_ERROR}); using the slow pure-PyTorch "
        "reference. Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
elif torch.cuda.is_available() and _BACKEND["cuda"] != "compiled CUDA":
    warnings.warn(
        "asl: a GPU is visible but the extension was built without CUDA kernels; CUDA tensors use the "
        "slow pure-PyTorch reference. Rebuild with nvcc on PATH (or FORCE_CUDA=1).",
        RuntimeWarning,
        stacklevel=2,
    )


def backends() -> dict[str, str]:
    """Which implementation serves CPU and CUDA tensors, plus the reason a build is missing."""
    report = dict(_BACKEND)
    if _EXT_ERROR is not None:
        report["extension_error"] = str(_EXT_ERROR)
    return report


@torch.library.register_fake("asl::active_shift")
def _fake_forward(input, shift, stride, padding):
    _check_args("active_shift", input, shift, stride, padding)
    N, C, H, W = input.shape
    Ho, Wo = output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1])
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return torch.empty((N, C, Ho, Wo), dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.register_fake("asl::active_shift_grad_input")
def _fake_grad_input(grad_output, input, shift, stride, padding):
    _check_args("active_shift_grad_input", input, shift, stride, padding, grad_output)
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.register_fake("asl::active_shift_grad_shift")
def _fake_grad_shift(grad_output, input, shift, stride, padding):
    _check_args("active_shift_grad_shift", input, shift, stride, padding, grad_output)
    return shift.new_empty(shift.shape)


@torch.library.register_fake("asl::active_shift_backward")
def _fake_backward(grad_output, input, shift, stride, padding):
    return _fake_grad_input(grad_output, input, shift, stride, padding), _fake_grad_shift(grad_output, input, shift, stride, padding)


def _check_scale_bias(input, scale, bias) -> None:
    torch._check_with(ValueError, input.dim() == 4, lambda: f"scale_bias_relu: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    C = input.shape[1]
    torch._check_with(ValueError, scale.numel() == C and bias.numel() == C,
                      lambda: f"scale_bias_relu: scale and bias need {C} values, got {scale.numel()} and {bias.numel()}")


def _check_pointwise(input, weight, bias, in_scale, in_bias) -> None:
    """conv1x1's checks (ext/fused_ops.cpp, `check_pointwise`)."""
    op = "conv1x1"
    torch._check_with(ValueError, input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    torch._check_with(TypeError, input.is_floating_point(), lambda: f"{op}: input must be a floating-point tensor, got {input.dtype}")
    C = input.shape[1]
    _check_weight(op, input, C, weight, bias)
    torch._check_with(ValueError, (in_scale is None) == (in_bias is None), lambda: f"{op}: in_scale and in_bias go together")
    if in_scale is not None:
        _check_vector(op, input, in_scale, "in_scale", C)
        _check_vector(op, input, in_bias, "in_bias", C)


@torch.library.register_fake("asl::conv1x1")
def _fake_conv1x1(input, weight, bias, in_scale, in_bias, relu):
    _check_pointwise(input, weight, bias, in_scale, in_bias)
    N, _, H, W = input.shape
    return input.new_empty((N, weight.shape[0], H, W))


@torch.library.register_fake("asl::scale_bias_relu")
def _fake_scale_bias_relu(input, scale, bias):
    _check_scale_bias(input, scale, bias)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("asl::shift_conv1x1")
def _fake_shift_conv1x1(input, shift, weight, bias, residual, stride, padding):
    _check_conv1x1(input, shift, weight, bias, residual, stride, padding)
    N, _, H, W = input.shape
    return input.new_empty((N, weight.shape[0], output_size(H, stride[0], padding[0]), output_size(W, stride[1], padding[1])))


def _backward(ctx, grad):
    input, shift = ctx.saved_tensors
    if torch.is_grad_enabled() and (grad.requires_grad or input.requires_grad or shift.requires_grad):
        # A backward that must itself be differentiable (create_graph=True, hessians, torch.func.grad):
        # the backward kernels have no derivatives, so it goes through the reference (slow, exact).
        _, vjp = torch.func.vjp(lambda a, b: reference_active_shift(a, b, tuple(ctx.stride), tuple(ctx.padding)), input, shift)
        grad_input, grad_shift = vjp(grad)
        return (grad_input if ctx.needs_input_grad[0] else None, grad_shift if ctx.needs_input_grad[1] else None, None, None)
    grad_input = grad_shift = None
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # one pass where the device has a fused kernel
        grad_input, grad_shift = torch.ops.asl.active_shift_backward(grad, input, shift, ctx.stride, ctx.padding)
        return grad_input, grad_shift, None, None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.asl.active_shift_grad_input(grad, input, shift, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        grad_shift = torch.ops.asl.active_shift_grad_shift(grad, input, shift, ctx.stride, ctx.padding)
    return grad_input, grad_shift, None, None


def _shift_derivatives(input, shift, stride, padding) -> tuple[Tensor, Tensor]:
    """d output / d alpha and d output / d beta at every output element. With the fractional part
    of one component set to 0, the operator interpolates along the other axis only, so the
    derivative along alpha is exactly op(x, (floor(alpha) + 1, beta)) - op(x, (floor(alpha), beta))
    (the right difference at integer shifts, as the shift gradient); likewise for beta."""
    fl = torch.floor(shift)
    op = _ActiveShift.apply
    alpha, beta = shift.unbind(1)
    d_alpha = op(input, torch.stack((fl[:, 0] + 1, beta), 1), stride, padding) - op(input, torch.stack((fl[:, 0], beta), 1), stride, padding)
    d_beta = op(input, torch.stack((alpha, fl[:, 1] + 1), 1), stride, padding) - op(input, torch.stack((alpha, fl[:, 1]), 1), stride, padding)
    return d_alpha, d_beta


class _ActiveShift(torch.autograd.Function):
    """The operator's autograd: reverse mode through the two backward operators, forward mode
    (`jvp`: linear in the input, the per-pixel shift derivatives for the shift), and torch.func
    transforms (vmap through the operators' batching rules below)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, shift, stride, padding):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.asl.active_shift(input, shift, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, shift, stride, padding = inputs
        ctx.save_for_backward(input, shift)
        ctx.save_for_forward(input, shift)
        ctx.stride, ctx.padding = stride, padding

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, t_input, t_shift, _t_stride=None, _t_padding=None):
        input, shift = ctx.saved_tensors
        out = None
        if t_input is not None:
            out = _ActiveShift.apply(t_input, shift, ctx.stride, ctx.padding)
        if t_shift is not None:
            d_alpha, d_beta = _shift_derivatives(input, shift, ctx.stride, ctx.padding)
            ta, tb = (t.reshape(1, -1, 1, 1) for t in t_shift.unbind(1))
            by_shift = (d_alpha * ta + d_beta * tb).to(input.dtype)
            out = by_shift if out is None else out + by_shift
        if out is None:
            N, C, H, W = input.shape
            out = input.new_zeros((N, C, output_size(H, ctx.stride[0], ctx.padding[0]), output_size(W, ctx.stride[1], ctx.padding[1])))
        return out


def _autograd_kernel(input, shift, stride, padding):
    # The raw operator's Autograd kernel. torch.func runs an autograd.Function only when it is
    # applied above the dispatcher (as `active_shift` does), never from inside a kernel: refuse
    # there with the way out rather than give wrong derivatives.
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("torch.ops.asl.active_shift cannot be called directly under torch.func transforms (grad, jvp, "
                           "jacrev, jacfwd, vmap); call asl_cli.ops.active_shift (or asl_cli.nn.ActiveShift2d), which supports them")
    return _ActiveShift.apply(input, shift, stride, padding)


_AUTOGRAD_LIB = torch.library.Library("asl", "IMPL")
_AUTOGRAD_LIB.impl("active_shift", _autograd_kernel, "Autograd")


# Batching rules (torch.vmap, and with it torch.func.jacrev/jacfwd): a batch of B inputs or shifts
# is B times the channels, (N, C, H, W) x B -> (N, B*C, H, W) with the shifts (B*C, 2), so one call
# of the operator serves the whole batch; when only the tensors without a channel-wise shift are
# batched they fold into N instead (no copy of the shifts).
def _batched_first(t: Tensor, dim, B: int) -> Tensor:
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(B, *t.shape)


def _channels_of_batch(t: Tensor) -> Tensor:
    """(B, N, C, H, W) -> (N, B*C, H, W)."""
    B, N, C, H, W = t.shape
    return t.transpose(0, 1).reshape(N, B * C, H, W)


def _batch_of_channels(t: Tensor, B: int) -> Tensor:
    """(N, B*C, H, W) -> (B, N, C, H, W)."""
    N, BC, H, W = t.shape
    return t.reshape(N, B, BC // B, H, W).transpose(0, 1)


def _vmap_rule(op_name: str, n_maps: int, returns: str):
    """A batching rule for an operator whose first n_maps arguments are (N, C, ...) tensors and
    whose next argument is the (C, 2) shift; `returns` says what it gives: "map", "shift" or both."""
    op = getattr(torch.ops.asl, op_name)

    def rule(info, in_dims, *args):
        B = info.batch_size
        maps, shift, rest = args[:n_maps], args[n_maps], args[n_maps + 1:]
        map_dims, shift_dim = in_dims[:n_maps], in_dims[n_maps]
        maps = [_batched_first(t, d, B) for t, d in zip(maps, map_dims)]
        if shift_dim is None and returns == "map":  # fold the batch into N
            out = op(*[t.reshape(-1, *t.shape[2:]) for t in maps], shift, *rest)
            return out.reshape(B, -1, *out.shape[1:]), 0
        shifts = _batched_first(shift, shift_dim, B).reshape(-1, 2)
        out = op(*[_channels_of_batch(t) for t in maps], shifts, *rest)
        if returns == "map":
            return _batch_of_channels(out, B), 0
        if returns == "shift":
            return out.reshape(B, -1, 2), 0
        return (_batch_of_channels(out[0], B), out[1].reshape(B, -1, 2)), (0, 0)

    torch.library.register_vmap(f"asl::{op_name}", rule)


for _name, _n_maps, _returns in (("active_shift", 1, "map"), ("active_shift_grad_input", 2, "map"),
                                 ("active_shift_grad_shift", 2, "shift"), ("active_shift_backward", 2, "both")):
    _vmap_rule(_name, _n_maps, _returns)


# FLOPs follow FlopCounterMode's convention (2 per multiply-add): 4 multiply-adds per output
# element forward, as counted in the paper; 4 per input element for the input gradient and 8 per
# output element for the two shift-gradient sums.
def _numel(shape) -> int:
    return math.prod(shape)


from torch.utils.flop_counter import register_flop_formula  # noqa: E402


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


# ----------------------------------------------------------------------------------------------
# The user-facing function.
# ----------------------------------------------------------------------------------------------
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
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    # The operator checks shapes, devices, stride and padding (C++ kernels, fake kernels and the
    # reference alike); which dtypes a device's kernels serve is this function's rule.
    allowed = _CUDA_DTYPES if input.device.type == "cuda" else _CPU_DTYPES
    if input.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"active_shift: input dtype {str(input.dtype).replace('torch.', '')} is not supported on {input.device.type}; use one of {names}")
    if torch.compiler.is_compiling():  # Dynamo cannot trace a Function with a jvp; the op is opaque to it
        return torch.ops.asl.active_shift(input, shift, [sh, sw], [ph, pw])
    return _ActiveShift.apply(input, shift, [sh, sw], [ph, pw])


def shift_conv1x1(input: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                  stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """Inference: `conv2d(active_shift(input, shift, stride, padding), weight, bias) + residual` in
    one operator. On the CPU it shifts a cache-sized piece of the output at a time (at stride 1 on
    AVX-512, 32-pixel panels straight from the input; otherwise tiles of output rows) and multiplies
    it at once, never writing the shifted tensor; on CUDA it is the two operators in sequence.
    No autograd (use `active_shift` and a convolution for training)."""
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    return torch.ops.asl.shift_conv1x1(input, shift, weight, bias, residual, [sh, sw], [ph, pw])
