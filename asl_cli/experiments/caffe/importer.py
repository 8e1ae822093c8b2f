"""`asl import-caffe`: the authors' trained AS-ResNet (Caffe) as a zoo checkpoint.

Blobs are mapped by the network's structure: the 3x3 stem convolution, then per residual block
the pre-activation Scale, the projection shortcut (a convolution whose output feeds the Eltwise
sum), the first 1x1 convolution, its Scale, the SpatialShift (blob 0 = alpha, along W; blob 1 =
beta, along H) and the second 1x1 convolution; then the final Scale and the classifier. The
deploy model's BatchNorm is merged into its Scale layers, so the BatchNorm blobs stored in the file
are stale: they are counted and set aside, and the model's BatchNorm gets identity statistics.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch

from ...train import checkpoint as ckpt_io
from .reader import CaffeFormatError, Layer, read_net
from ...config import load_config
from ...errors import CaffeMismatch, UnknownModel
from ...zoo import create_model, list_models
from ...zoo.as_resnet import ASResNet

CAFFE_PREPROCESSING = {"kind": "caffe", "resize": [256, 256], "crop": 224, "channel_order": "BGR",
                       "mean": [103.94, 116.78, 123.68], "scale": 0.017352}


def _consumers(layers: list[Layer]) -> dict[str, list[Layer]]:
    out: dict[str, list[Layer]] = {}
    for layer in layers:
        for b in layer.bottom:
            out.setdefault(b, []).append(layer)
    return out


def _set(param: torch.Tensor, blob, what: str) -> int:
    t = torch.from_numpy(blob.data.copy()).view(blob.shape) if blob.shape else torch.from_numpy(blob.data.copy())
    if t.numel() != param.numel() or (t.dim() == param.dim() and tuple(t.shape) != tuple(param.shape)):
        raise CaffeMismatch(f"{what}: the file holds shape {tuple(blob.shape)}, the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(t.view(param.shape))
    return t.numel()


def _bn_from_scale(bn: torch.nn.BatchNorm2d, layer: Layer) -> int:
    if layer.type != "Scale" or len(layer.blobs) != 2:
        raise CaffeMismatch(f"expected a Scale layer with gamma and beta here, found {layer.type} {layer.name!r}")
    n = _set(bn.weight, layer.blobs[0], f"{layer.name} (gamma)") + _set(bn.bias, layer.blobs[1], f"{layer.name} (beta)")
    with torch.no_grad():  # identity statistics: y = gamma * x + beta exactly
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)
    return n


def import_model(path: str | Path, arch: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, report) for a Caffe AS-ResNet file. `arch` is a zoo name (default: from the stem width)."""
    name, layers = read_net(path)
    weighted = [l for l in layers if l.blobs]
    stale = [l for l in weighted if l.type == "BatchNorm"]
    seq = [l for l in weighted if l.type != "BatchNorm"]
    if not seq or seq[0].type != "Convolution" or len(seq[0].blobs[0].shape) != 4 or seq[0].blobs[0].shape[1:] != (3, 3, 3):
        first = f"{seq[0].type} {seq[0].name!r} {[b.shape for b in seq[0].blobs]}" if seq else "nothing"
        raise CaffeMismatch(f"{path}: not an AS-ResNet (expected a 3x3 convolution on RGB input first, found {first})")
    width = seq[0].blobs[0].shape[0]
    fc = seq[-1]
    if fc.type != "InnerProduct":
        raise CaffeMismatch(f"{path}: not an AS-ResNet (the last weighted layer is {fc.type} {fc.name!r}, not the classifier)")
    num_classes = fc.blobs[0].shape[0]
    if arch is None:
        arch = f"as_resnet_w{width}" if f"as_resnet_w{width}" in list_models("as_resnet") else "as_resnet_w32"
    if not arch.startswith("as_resnet"):
        raise CaffeMismatch(f"--arch must be an AS-ResNet (as_resnet_w32, _w50, _w68), got {arch!r}")
    args = {"num_classes": num_classes}
    try:
        model = create_model(arch, **args)
    except UnknownModel as e:
        raise UnknownModel(f"--arch: {e}") from None
    if not isinstance(model, ASResNet) or model.stem.out_channels != width:
        raise CaffeMismatch(f"{path} has base width {width} (stem conv0 {seq[0].blobs[0].shape}) but {arch} has width {model.stem.out_channels}; "
                           f"use --arch as_resnet_w{width}")

    consumers = _consumers(layers)
    count = Counter()
    it = iter(seq)

    def take(kind: str, what: str) -> Layer:
        try:
            layer = next(it)
        except StopIteration:
            raise CaffeMismatch(f"{path} ends before {what} (is it a smaller network than {arch}?)") from None
        if layer.type != kind:
            raise CaffeMismatch(f"{what}: expected a {kind} layer, found {layer.type} {layer.name!r}")
        return layer

    stem = take("Convolution", "stem")
    count["conv"] += _set(model.stem.weight, stem.blobs[0], f"{stem.name} (stem)")
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            where = f"stage {s} block {b}"
            count["scale"] += _bn_from_scale(block.preact[0], take("Scale", f"{where} pre-activation"))
            conv = take("Convolution", f"{where} first 1x1 conv")
            feeds_sum = any(c.type == "Eltwise" for c in consumers.get(conv.top[0], []))
            if feeds_sum:
                if block.shortcut is None:
                    raise CaffeMismatch(f"{where}: the file has a projection shortcut {conv.name!r} where {arch} has none")
                count["conv"] += _set(block.shortcut.weight, conv.blobs[0], f"{conv.name} (shortcut)")
                conv = take("Convolution", f"{where} first 1x1 conv")
            elif block.shortcut is not None:
                raise CaffeMismatch(f"{where}: {arch} has a projection shortcut but the file has none here")
            count["conv"] += _set(block.conv1.weight, conv.blobs[0], conv.name)
            count["scale"] += _bn_from_scale(block.bn1[0], take("Scale", f"{where} BN after the first 1x1"))
            sh = take("SpatialShift", f"{where} active shift")
            if len(sh.blobs) != 2:
                raise CaffeMismatch(f"{sh.name}: expected two blobs (alpha, beta), found {len(sh.blobs)}")
            layer = block.spatial
            C = layer.shift.shape[0]
            for i, blob in enumerate(sh.blobs):
                if blob.data.size != C:
                    raise CaffeMismatch(f"{sh.name}: blob {i} holds {blob.data.size} shifts, the model has {C} channels")
                with torch.no_grad():
                    layer.shift[:, i] = torch.from_numpy(blob.data.copy())
                count["shift"] += C
            conv2 = take("Convolution", f"{where} second 1x1 conv")
            count["conv"] += _set(block.conv2.weight, conv2.blobs[0], conv2.name)
    count["scale"] += _bn_from_scale(model.head[0], take("Scale", "final BN"))
    fcl = take("InnerProduct", "classifier")
    count["fc"] += _set(model.fc.weight, fcl.blobs[0], f"{fcl.name} (weight)")
    count["fc"] += _set(model.fc.bias, fcl.blobs[1], f"{fcl.name} (bias)")
    left = list(it)
    if left:
        raise CaffeMismatch(f"{path}: {len(left)} weighted layers left unmapped after {arch}: {', '.join(l.name for l in left[:5])}")
    count["stale_bn"] = sum(b.data.size for l in stale for b in l.blobs)
    total = sum(b.data.size for l in weighted for b in l.blobs)
    accounted = sum(count.values())
    if accounted != total:
        raise CaffeMismatch(f"{path}: {total} stored values but {accounted} accounted for")
    report = {"file": str(path), "net_name": name, "arch": arch, "layers": len(layers), "weighted_layers": len(weighted),
              "values": total, **{f"values_{k}": v for k, v in count.items()}, "model_args": args}
    return model.eval(), report


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_checkpoint(model: torch.nn.Module, report: dict, out: str | Path) -> Path:
    from ...train.state import shift_values

    cfg = load_config("as_resnet_w32", [f"model.name={report['arch']}"])
    obj = {
        "format": ckpt_io.FORMAT,
        "model_name": report["arch"],
        "model_args": report["model_args"],
        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "step": 0,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "preprocessing": CAFFE_PREPROCESSING,
        "shifts": shift_values(model),
        "source": {**{k: v for k, v in report.items() if k != "model_args"}, "sha256": sha256(report["file"])},
    }
    return ckpt_io.save_atomic(obj, Path(out))


__all__ = ["import_model", "to_checkpoint", "CaffeMismatch", "CaffeFormatError", "CAFFE_PREPROCESSING"]
