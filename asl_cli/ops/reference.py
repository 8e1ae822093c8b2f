"""Pure-PyTorch active shift: the specification the kernels meet (differentiable through autograd,
slow), its gradients by autograd, and the obvious F.grid_sample formulation used as a peer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import IntPair, memory_format, output_size, pair


def _shift_limit(H, W, Ho, Wo, stride, padding) -> float:
    # Beyond this |shift| every tap lies outside the image; clamping keeps indices small.
    return float(max(H + Ho * stride[0] + padding[0], W + Wo * stride[1] + padding[1]) + 4)


def reference_active_shift(input: Tensor, shift: Tensor, stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """Direct transcription of the operator's formula in PyTorch ops (slow, differentiable)."""
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
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
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
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


def reference_forward(input, shift, stride, padding) -> Tensor:
    """The operator's forward as a kernel: the reference in the input's memory format."""
    return reference_active_shift(input, shift, tuple(stride), tuple(padding)).contiguous(memory_format=memory_format(input))


def reference_grad(grad, input, shift, stride, padding, wrt: str) -> Tensor:
    """The input ("input") or shift ("shift") gradient of the reference, by autograd."""
    with torch.enable_grad():
        x = input.detach().requires_grad_(wrt == "input")
        s = shift.detach().requires_grad_(wrt == "shift")
        out = reference_active_shift(x, s, tuple(stride), tuple(padding))
        (g,) = torch.autograd.grad(out, x if wrt == "input" else s, grad.to(out.dtype))
    if wrt == "input":
        return g.contiguous(memory_format=memory_format(input))
    return g.to(shift.dtype).contiguous()
