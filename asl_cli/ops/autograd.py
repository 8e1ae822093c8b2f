"""The active shift's autograd: reverse mode through the backward operators, forward mode (jvp),
and torch.func transforms (vmap through the operators' batching rules)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import library  # noqa: F401  (the operators must be declared first)
from .checks import output_shape
from .reference import reference_active_shift


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
    op = apply_active_shift
    alpha, beta = shift.unbind(1)
    d_alpha = op(input, torch.stack((fl[:, 0] + 1, beta), 1), stride, padding) - op(input, torch.stack((fl[:, 0], beta), 1), stride, padding)
    d_beta = op(input, torch.stack((alpha, fl[:, 1] + 1), 1), stride, padding) - op(input, torch.stack((alpha, fl[:, 1]), 1), stride, padding)
    return d_alpha, d_beta


def _forward(input, shift, stride, padding):
    with torch._C._AutoDispatchBelowAutograd():  # the kernels, not the raw operator's Autograd kernel again
        return torch.ops.asl.active_shift.default(input, shift, stride, padding)


def _save(ctx, input, shift, stride, padding):
    ctx.save_for_backward(input, shift)
    ctx.save_for_forward(input, shift)
    ctx.stride, ctx.padding = stride, padding


def _jvp(ctx, t_input, t_shift, _t_stride=None, _t_padding=None):
    input, shift = ctx.saved_tensors
    out = None
    if t_input is not None:
        out = apply_active_shift(t_input, shift, ctx.stride, ctx.padding)
    if t_shift is not None:
        d_alpha, d_beta = _shift_derivatives(input, shift, ctx.stride, ctx.padding)
        ta, tb = (t.reshape(1, -1, 1, 1) for t in t_shift.unbind(1))
        by_shift = (d_alpha * ta + d_beta * tb).to(input.dtype)
        out = by_shift if out is None else out + by_shift
    if out is None:
        out = input.new_zeros(output_shape(input, input.shape[1], ctx.stride, ctx.padding))
    return out


class ActiveShiftFunction(torch.autograd.Function):
    """The operator's autograd under torch.func transforms (which need `setup_context`): reverse
    mode through the two backward operators, forward mode (`jvp`: linear in the input, the
    per-pixel shift derivatives for the shift), and vmap through the operators' batching rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, shift, stride, padding):
        return _forward(input, shift, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


class EagerActiveShiftFunction(torch.autograd.Function):
    """The same autograd with the context set in `forward`. torch binds the arguments of a Function
    that has `setup_context` with inspect.signature on every call (~40 us on a 2-core EPYC, more
    than the kernel itself on CIFAR-sized layers); outside torch.func transforms this one serves."""

    @staticmethod
    def forward(ctx, input, shift, stride, padding):
        _save(ctx, input, shift, stride, padding)
        return _forward(input, shift, stride, padding)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


def _differentiated(*tensors: Tensor) -> bool:
    """Whether autograd may have to record a call on these tensors: reverse mode, or any call
    inside a forward-mode dual level (where tangents, possibly batched, can ride on them)."""
    return forward_ad._current_level >= 0 or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def apply_active_shift(input, shift, stride, padding):
    """The active shift with its autograd: the torch.func-ready Function under transforms, else the
    eager one, or the kernel alone when autograd has nothing to record."""
    if torch._C._are_functorch_transforms_active():
        return ActiveShiftFunction.apply(input, shift, stride, padding)
    if not _differentiated(input, shift):  # inference, benchmarks: without the Function's ~10-40 us
        return _forward(input, shift, stride, padding)
    return EagerActiveShiftFunction.apply(input, shift, stride, padding)


def _autograd_kernel(input, shift, stride, padding):
    # The raw operator's Autograd kernel. torch.func runs an autograd.Function only when it is
    # applied above the dispatcher (as `active_shift` does), never from inside a kernel: refuse
    # there with the way out rather than give wrong derivatives.
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("torch.ops.asl.active_shift cannot be called directly under torch.func transforms (grad, jvp, "
                           "jacrev, jacfwd, vmap); call asl_cli.ops.active_shift (or asl_cli.nn.ActiveShift2d), which supports them")
    return apply_active_shift(input, shift, stride, padding)


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
