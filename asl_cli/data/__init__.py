"""Datasets and their input pipelines.

Small-image datasets (synthetic, cifar10/100, npz, a folder of images) are decoded into uint8
tensors and batched on the training device (`tensors.TensorBatches`); ImageNet uses torchvision's
ImageFolder with a DataLoader. `folder` reads image folders, `preprocess` turns image files into
model inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .tensors import (DataError, TensorBatches, TensorData, channel_stats, normalized_batches, normalizer,
                      steps_per_epoch, to_device)

__all__ = ["DataError", "TensorBatches", "TensorData", "channel_stats", "normalized_batches", "normalizer",
           "steps_per_epoch", "to_device", "SYNTHETIC_CLASSES", "make_synthetic", "synthetic", "cifar", "npz",
           "load_tensor_data", "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_folders"]


# ---------------------------------------------------------------------------------------------
# synthetic: shapes at random positions, sizes and colours on noisy backgrounds; the class is the
# shape, so it takes spatial context to tell them apart (colour carries no information).
# ---------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("square", "square outline", "disk", "ring", "horizontal bar", "vertical bar", "plus", "diagonal", "cross", "triangle")


def _shape_masks(cls: Tensor, cy: Tensor, cx: Tensor, s: Tensor, size: int) -> Tensor:
    yy = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    dy, dx = yy - cy.view(-1, 1, 1), xx - cx.view(-1, 1, 1)
    s = s.view(-1, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    cheb, r = torch.maximum(adx, ady), torch.sqrt(dx**2 + dy**2)
    hbar = (ady <= 1.5) & (adx <= s)
    vbar = (adx <= 1.5) & (ady <= s)
    diag = ((dx - dy).abs() <= 1.2) & (cheb <= s)
    anti = ((dx + dy).abs() <= 1.2) & (cheb <= s)
    masks = torch.stack([
        cheb <= s * 0.8,
        (cheb <= s) & (cheb >= s - 1.6),
        r <= s,
        (r <= s) & (r >= s - 1.8),
        hbar,
        vbar,
        hbar | vbar,
        diag,
        diag | anti,
        (dy <= s * 0.8) & (dy >= -s) & (adx <= (dy + s) * 0.5),
    ], dim=1)  # (N, 10, H, W)
    return masks[torch.arange(len(cls)), cls]


def make_synthetic(n: int, seed: int, size: int = 32, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """n images (uint8, N x 3 x size x size) and labels, a deterministic function of seed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    s = 4 + torch.rand(n, generator=g) * 5
    cy = s + 1 + torch.rand(n, generator=g) * (size - 2 * s - 2)
    cx = s + 1 + torch.rand(n, generator=g) * (size - 2 * s - 2)
    fg = torch.rand(n, 3, generator=g)
    bg = torch.rand(n, 3, generator=g)
    # keep foreground and background apart in brightness so the shape is visible
    bg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 0.6, 1 - fg, bg)
    mask = _shape_masks(y, cy, cx, s, size).unsqueeze(1).float()
    img = fg[:, :, None, None] * mask + bg[:, :, None, None] * (1 - mask)
    img = img + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def synthetic(train_size: int, test_size: int, seed: int) -> TensorData:
    xtr, ytr = make_synthetic(train_size, seed)
    xte, yte = make_synthetic(test_size, seed + 7919)
    mean, std = channel_stats(xtr)
    return TensorData(xtr, ytr, xte, yte, 10, mean, std, "synthetic", "generated")


# ---------------------------------------------------------------------------------------------
def cifar(name: str, root: str, download: bool) -> TensorData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except (RuntimeError, OSError) as e:
        raise DataError(
            f"{name} not found under {Path(root).resolve()} and could not be downloaded ({e.__class__.__name__}: {e}). "
            f"Put the extracted '{folder}' folder (torchvision's format) in {Path(root).resolve()}, or set data.root=..."
        ) from None

    def to_t(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    xtr, ytr = to_t(tr)
    xte, yte = to_t(te)
    mean, std = channel_stats(xtr)
    return TensorData(xtr, ytr, xte, yte, 10 if name == "cifar10" else 100, mean, std, name, "torchvision pickle (lossless)")


def npz(path: str) -> TensorData:
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise DataError(f"npz dataset {p.resolve()} does not exist")
    try:
        with np.load(p) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile/pickle/value errors from a broken file
        raise DataError(f"cannot read {p}: {e}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{p} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, y_test")
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(f"{p}: x_{split} must be uint8 images N x H x W x 3, got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{p}: y_{split} must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        out += [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64))]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"{p}: train and test images differ in size: {tuple(out[0].shape[1:])} vs {tuple(out[2].shape[1:])}")
    for split, x in (("train", out[0]), ("test", out[2])):
        if len(x) == 0:
            raise DataError(f"{p}: x_{split} holds no images")
    num_classes = int(max(out[1].max(), out[3].max())) + 1
    if min(out[1].min(), out[3].min()) < 0:
        raise DataError(f"{p}: labels must be >= 0")
    seen = torch.unique(out[1])
    if len(seen) != num_classes:
        raise DataError(f"{p}: labels must be the class numbers 0..K-1 with every class in y_train; y_train has "
                        f"{len(seen)} distinct labels but the largest label is {num_classes - 1} (a {num_classes}-class model)")
    mean, std = channel_stats(out[0])
    return TensorData(*out, num_classes, mean, std, f"npz:{p.name}", "npz uint8")


def load_tensor_data(cfg: dict) -> TensorData:
    d = cfg["data"]
    if d["dataset"] == "folder":
        from .folder import image_folder

        return image_folder(d["path"], d["cache"])
    if d["dataset"] == "synthetic":
        return synthetic(d["train_size"], d["test_size"], d["seed"])
    if d["dataset"] in ("cifar10", "cifar100"):
        return cifar(d["dataset"], d["root"], d["download"])
    if d["dataset"] == "npz":
        return npz(d["path"])
    raise DataError(f"{d['dataset']} is not a tensor dataset")


# ---------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_folders(root: str, image_size: int, resize: int):
    """ImageFolder train/val with the paper's preprocessing: resize to resize x resize, random
    crop + flip for training, center crop for testing."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DataError(f"imagenet: {base.resolve() / split} not found; expected {base.resolve()}/train/<class>/*.JPEG and {base.resolve()}/val/<class>/*.JPEG")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.Resize((resize, resize)), T.RandomCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize((resize, resize)), T.CenterCrop(image_size), T.ToTensor(), norm])
    tr, te = ImageFolder(str(base / "train"), train_tf), ImageFolder(str(base / "val"), test_tf)
    if tr.classes != te.classes:
        raise DataError("imagenet: train/ and val/ have different class folders")
    return tr, te
