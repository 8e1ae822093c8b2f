"""The inference form of a zoo model or checkpoint: the same function, rearranged for speed.

What folds where, in the pre-activation order of a block (BN0-ReLU, 1x1, BN1-ReLU, spatial, 1x1, +):
- BN1 follows the first 1x1 convolution, so it folds into that convolution's weight and bias, and
  its ReLU is applied to the product before it is stored;
- the BatchNorm after a 3x3 depthwise convolution (1B-DW3-B-1) folds into the depthwise weights;
- BN0 sits on the residual stream, whose raw value the identity shortcut still needs, so it cannot
  fold into the previous block's last convolution; it becomes a per-channel scale-and-bias with its
  ReLU applied by the first 1x1 convolution as it reads its input (`asl::conv1x1`), or, where a
  projection shortcut reads the pre-activated input too, one pass of its own (`ScaleBiasReLU`), as
  for the head's BatchNorm;
- the active shift and the 1x1 convolution after it become one operator (`shift_conv1x1`) that
  also adds the shortcut, so the shifted tensor is never written out on the CPU.
Other models (MobileNetV2, ShiftResNet's post-activation blocks) get every BatchNorm that directly
follows a convolution folded into it. Outputs equal the eager model's up to float rounding (tested).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_eval

from .nn import ActiveShift2d
from .ops import shift_conv1x1
from .zoo.blocks import PreActBlock
from .zoo.shiftresnet import ShiftBlock

FORMS = ("eager", "inference", "frozen", "frozen-inference", "compile")


class ScaleBiasReLU(nn.Module):
    """relu(x * scale + bias) per channel: an evaluation-mode BatchNorm with its ReLU, one pass."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias", (bn.bias.detach() - bn.running_mean * scale).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.asl.scale_bias_relu(x, self.scale, self.bias)


class Conv1x1(nn.Module):
    """A 1x1 convolution (any stride, no padding) with an optional bias (BatchNorm folded), ReLU
    and input transform relu(x * scale + bias) (the pre-activation BatchNorm and ReLU before it), as
    one `asl::conv1x1`: on the CPU a transform-in-cache-then-multiply kernel, so neither the
    transformed input nor the product before its bias and ReLU is ever written out. A strided
    convolution reads the subsampled input. The weight is kept transposed (a (C_out, C) view of a
    (C, C_out) tensor), the layout the CPU kernel multiplies with."""

    def __init__(self, conv: nn.Conv2d, relu: bool, pre: ScaleBiasReLU | None = None):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError(f"Conv1x1 takes an ungrouped 1x1 convolution without padding, got {conv}")
        self.register_buffer("weight_t", conv.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None else None)
        self.register_buffer("in_scale", pre.scale.clone() if pre is not None else None)
        self.register_buffer("in_bias", pre.bias.clone() if pre is not None else None)
        self.stride, self.relu = tuple(conv.stride), relu

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != (1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        return torch.ops.asl.conv1x1(x, self.weight_t.t(), self.bias, self.in_scale, self.in_bias, self.relu)


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    return fuse_conv_bn_eval(conv.eval(), bn.eval())


class InferenceBlock(nn.Module):
    """A PreActBlock with its BatchNorms folded and, for the active shift, the shift fused into
    the last 1x1 convolution together with the shortcut's addition."""

    def __init__(self, block: PreActBlock):
        super().__init__()
        pre = ScaleBiasReLU(block.preact[0])
        conv1 = _conv_bn(block.conv1, block.bn1[0])
        if block.shortcut is None:  # BN0-ReLU applied inside conv1 as it reads its input
            self.pre, self.conv1, self.shortcut = None, Conv1x1(conv1, relu=True, pre=pre), None
        else:  # the projection shortcut reads the pre-activated input too: computed once
            self.pre, self.conv1 = pre, Conv1x1(conv1, relu=True)
            self.shortcut = Conv1x1(block.shortcut, relu=False)
        sp = block.spatial
        if isinstance(sp, ActiveShift2d):
            self.register_buffer("shift", sp.shift.detach().clone())
            self.register_buffer("weight2_t", block.conv2.weight.detach().flatten(1).t().contiguous())
            self.stride, self.padding = sp.stride, sp.padding
            self.spatial, self.conv2 = None, None
        else:
            if isinstance(sp, nn.Sequential):  # 3x3 depthwise, BN, ReLU
                self.spatial = nn.Sequential(_conv_bn(sp[0], sp[1]), nn.ReLU(inplace=True))
            else:
                self.spatial = sp
            self.conv2 = block.conv2

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is None:
            h, skip = self.conv1(x), x
        else:
            pre = self.pre(x)
            h, skip = self.conv1(pre), self.shortcut(pre)
        if self.spatial is None:
            return shift_conv1x1(h, self.shift, self.weight2_t.t(), None, skip, self.stride, self.padding)
        return self.conv2(self.spatial(h)) + skip


def fold_sequential_conv_bn(module: nn.Module) -> None:
    """Folds every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential."""
    for child in module.children():
        fold_sequential_conv_bn(child)
    if isinstance(module, nn.Sequential):
        mods = list(module)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                module[i] = _conv_bn(mods[i], mods[i + 1])
                module[i + 1] = nn.Identity()


def _replace(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, PreActBlock):
            setattr(module, name, InferenceBlock(child))
        elif isinstance(child, ShiftBlock):  # conv-BN pairs in a post-activation block
            child.conv1, child.bn1 = _conv_bn(child.conv1, child.bn1), nn.Identity()
            child.conv2, child.bn2 = _conv_bn(child.conv2, child.bn2), nn.Identity()
            _replace(child)
        elif isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[0], nn.BatchNorm2d) \
                and isinstance(child[1], nn.ReLU):
            setattr(module, name, ScaleBiasReLU(child[0]))  # a BN-ReLU on its own (the head)
        else:
            _replace(child)


@torch.no_grad()
def inference_form(model: nn.Module) -> nn.Module:
    """A copy of `model` in its inference form (evaluation mode, no gradients)."""
    m = copy.deepcopy(model).eval()
    _replace(m)
    fold_sequential_conv_bn(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@torch.no_grad()
def frozen(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """Frozen TorchScript (traced, BatchNorm folded and oneDNN-fused by torch.jit's passes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def make_form(model: nn.Module, form: str, example: Tensor) -> nn.Module:
    """`model` in one of FORMS: eager, inference (this module), frozen (TorchScript of the eager
    model), frozen-inference (TorchScript of the inference form), compile (torch.compile of the
    inference form)."""
    if form == "eager":
        return copy.deepcopy(model).eval()
    if form == "inference":
        return inference_form(model)
    if form == "frozen":
        return frozen(model, example)
    if form == "frozen-inference":
        return frozen(inference_form(model), example)
    if form == "compile":
        return torch.compile(inference_form(model))
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
