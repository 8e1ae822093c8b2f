"""ONNX export of zoo models and checkpoints, with the active shift in standard ONNX operators only.

At inference a shift layer's (alpha, beta) are constants, so each channel's bilinear sample is fixed:
its integer offset (floor of the shift) picks a window of the input, and its four weights blend the
2 x 2 taps at that offset. Two standard forms are offered:
- "slice": the input is padded with zeros once, channels that share an integer offset are
  gathered and sliced to their window together (Gather + Slice per distinct offset), put back in order, and blended by a
  2 x 2 depthwise convolution holding each channel's four weights (with the layer's stride).
  Integer shifts (GS, SI) need no blend: the window is sliced with the stride.
- "conv": one depthwise convolution whose kernel spans every channel's offset (most of it zeros),
  on the input padded to cover it. One operator, but its kernel grows with the shifts' range.
Which is faster depends on the runtime and the shifts; `asl export --shift-form` picks, and
`asl profile models --runtime onnxruntime` times both.

BatchNorms that directly follow a convolution are folded into it (as the inference form does); the
pre-activation BatchNorms stay, since the identity shortcut needs the raw residual stream.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_eval

from .errors import ExportError
from .inference import fold_sequential_conv_bn
from .nn import ActiveShift2d
from .zoo.blocks import GroupedShift2d, PreActBlock
from .zoo.shiftresnet import ShiftBlock

SHIFT_FORMS = ("conv", "slice")
OPSET = 18


def window(x: Tensor, top: int, rows: int, left: int, cols: int) -> Tensor:
    """x[..., top + r, left + q] for r < rows, q < cols, zero outside x (constant pads and slices)."""
    H, W = x.shape[-2], x.shape[-1]
    pt, pb = max(0, -top), max(0, top + rows - H)
    pl, pr = max(0, -left), max(0, left + cols - W)
    if pt or pb or pl or pr:
        x = F.pad(x, (pl, pr, pt, pb))
    r0, c0 = top + pt, left + pl
    return x[..., r0:r0 + rows, c0:c0 + cols]


class StandardShift2d(nn.Module):
    """An active shift with fixed shifts, for an input of a fixed spatial size, in standard ops."""

    def __init__(self, shift: Tensor, stride: tuple[int, int], padding: tuple[int, int], size: tuple[int, int],
                 form: str = "conv"):
        super().__init__()
        if form not in SHIFT_FORMS:
            raise ValueError(f"shift form must be one of {', '.join(SHIFT_FORMS)}, got {form!r}")
        s = shift.detach().double().cpu()
        if not torch.isfinite(s).all():
            raise ExportError("a shift layer holds non-finite shifts; such a model has no ONNX form")
        self.form, self.stride, self.padding, self.size = form, tuple(stride), tuple(padding), tuple(size)
        H, W = size
        (sh, sw), (ph, pw) = self.stride, self.padding
        self.out_size = ((H + 2 * ph - 1) // sh + 1, (W + 2 * pw - 1) // sw + 1)
        offc, offr = s[:, 0].floor(), s[:, 1].floor()  # alpha moves along W (columns), beta along H (rows)
        fc, fr = s[:, 0] - offc, s[:, 1] - offr
        self.offr, self.offc = offr.long().tolist(), offc.long().tolist()
        w = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], 1)  # taps (0,0) (0,1) (1,0) (1,1)
        self.integer = bool((fr == 0).all() and (fc == 0).all())
        C = s.shape[0]
        if form == "slice":
            groups: dict[tuple[int, int], list[int]] = {}
            for c, key in enumerate(zip(self.offr, self.offc)):
                groups.setdefault(key, []).append(c)
            self.groups = list(groups.items())
            order = [c for _, cs in self.groups for c in cs]
            self.permuted = order != list(range(C))
            for i, (_, cs) in enumerate(self.groups):
                self.register_buffer(f"index{i}", torch.tensor(cs), persistent=False)
            self.register_buffer("inverse", torch.argsort(torch.tensor(order)), persistent=False)
            self.register_buffer("weight", w.float().reshape(C, 1, 2, 2), persistent=False)
        else:
            r0, c0 = min(self.offr), min(self.offc)
            kh, kw = max(self.offr) - r0 + 2, max(self.offc) - c0 + 2
            k = torch.zeros(C, 1, kh, kw, dtype=torch.float64)
            for c in range(C):
                r, q = self.offr[c] - r0, self.offc[c] - c0
                k[c, 0, r:r + 2, q:q + 2] = w[c].reshape(2, 2)
            self.origin = (r0, c0)
            self.register_buffer("weight", k.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        (sh, sw), (ph, pw), (Ho, Wo) = self.stride, self.padding, self.out_size
        if tuple(x.shape[-2:]) != self.size:
            raise ExportError(f"this shift was exported for {self.size[0]}x{self.size[1]} inputs, got "
                              f"{x.shape[-2]}x{x.shape[-1]}")
        C = x.shape[1]
        if self.form == "conv":
            r0, c0 = self.origin
            kh, kw = self.weight.shape[-2:]
            xw = window(x, r0 - ph, (Ho - 1) * sh + kh, c0 - pw, (Wo - 1) * sw + kw)
            return F.conv2d(xw, self.weight.to(x.dtype), stride=self.stride, groups=C)
        rows = (Ho - 1) * sh + (1 if self.integer else 2)
        cols = (Wo - 1) * sw + (1 if self.integer else 2)
        # one zero border wide enough for every group, then a slice per group of channels
        tops, lefts = [r - ph for (r, _), _ in self.groups], [q - pw for (_, q), _ in self.groups]
        top, left = min(tops), min(lefts)
        xp = window(x, top, max(tops) - top + rows, left, max(lefts) - left + cols)
        parts = []
        for i, ((r, q), _) in enumerate(self.groups):
            xg = xp if len(self.groups) == 1 else xp.index_select(1, getattr(self, f"index{i}"))
            r0, c0 = r - ph - top, q - pw - left
            parts.append(xg[..., r0:r0 + rows, c0:c0 + cols])
        xw = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self.permuted:
            xw = xw.index_select(1, self.inverse)
        if self.integer:
            return xw[..., ::sh, ::sw]
        return F.conv2d(xw, self.weight.to(x.dtype), stride=self.stride, groups=C)


def _fold(module: nn.Module) -> None:
    """Folds every BatchNorm that directly follows a convolution into it, in place: the blocks'
    own pairs here, those inside an nn.Sequential as the inference form folds them."""
    for m in module.modules():
        if isinstance(m, PreActBlock):
            m.conv1 = fuse_conv_bn_eval(m.conv1, m.bn1[0])
            m.bn1[0] = nn.Identity()
        elif isinstance(m, ShiftBlock):
            m.conv1, m.bn1 = fuse_conv_bn_eval(m.conv1, m.bn1), nn.Identity()
            m.conv2, m.bn2 = fuse_conv_bn_eval(m.conv2, m.bn2), nn.Identity()
    fold_sequential_conv_bn(module)


SHIFT_TYPES = (ActiveShift2d, GroupedShift2d)


def has_shift(model: nn.Module) -> bool:
    return any(isinstance(m, SHIFT_TYPES) for m in model.modules())


@torch.no_grad()
def export_form(model: nn.Module, input_shape: tuple[int, int, int, int], shift_form: str = "conv") -> nn.Module:
    """A copy of `model` (evaluation mode) computing the same in standard operators only: BatchNorms
    folded into the convolutions before them, every shift layer as a StandardShift2d sized by a
    forward pass on an input of `input_shape`."""
    m = copy.deepcopy(model).float().eval()
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[-2:])))
             for mod in m.modules() if isinstance(mod, SHIFT_TYPES)]
    m(torch.zeros(input_shape))
    for h in hooks:
        h.remove()
    _fold(m)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, SHIFT_TYPES):
                if child not in sizes:
                    raise ExportError(f"shift layer {name!r} is not used in the forward pass")
                stride = getattr(child, "stride", (1, 1))
                padding = getattr(child, "padding", (0, 0))
                setattr(parent, name, StandardShift2d(child.shift, stride, padding, sizes[child], shift_form))
            else:
                swap(child)

    swap(m)
    return m


@contextlib.contextmanager
def _quiet():
    """Silences the exporter's progress lines, which it prints to stdout."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int, int],
                shift_form: str = "conv", dynamic_batch: bool = True) -> dict:
    """Writes `model` as an ONNX file of standard operators; returns what was written (opset,
    forms, input and output names)."""
    import onnx  # the optional `deploy` extra

    m = export_form(model, input_shape, shift_form)
    example = torch.randn(input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")  # the exporter's notices
        try:
            dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            program = torch.onnx.export(m, (example,), input_names=["input"], output_names=["logits"],
                                        opset_version=OPSET, dynamo=True, dynamic_shapes=dyn, verbose=False)
        except Exception as e:  # an operation with no ONNX form
            raise ExportError(f"the model has an operation with no ONNX form: {str(e).splitlines()[0]}") from e
        program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"the exported graph uses operators outside standard ONNX ({', '.join(custom)})")
    return {"path": str(path), "opset": OPSET, "shift_form": shift_form, "input_shape": list(input_shape),
            "nodes": len(proto.graph.node), "ops": sorted({n.op_type for n in proto.graph.node})}


__all__ = ["SHIFT_FORMS", "OPSET", "ExportError", "StandardShift2d", "export_form", "export_onnx", "has_shift", "window"]
