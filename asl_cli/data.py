"""Datasets and their input pipelines.

Small-image datasets (synthetic, cifar10/100, npz) are held as uint8 tensors, on the training
device when asked, and batched by `TensorBatches`: the order and the augmentation (pad-4 random
crop + horizontal flip) of global batch k depend only on (seed, k), which makes resuming exact
and lets every distributed rank take its slice of the same global batch. ImageNet uses
torchvision's ImageFolder with a DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


class DataError(RuntimeError):
    """Missing or malformed data; the message says where the files must be."""


@dataclass
class TensorData:
    x_train: Tensor  # uint8 (N, 3, H, W)
    y_train: Tensor  # int64 (N,)
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, float, float]  # per channel, 0-1 scale
    std: tuple[float, float, float]
    name: str
    encoding: str = "uint8"  # how the images were stored before decoding (e.g. PNG, JPEG q75)

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]


def channel_stats(x: Tensor) -> tuple[tuple, tuple]:
    xf = x.double() / 255
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).tolist())


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
        from .image_folder import image_folder

        return image_folder(d["path"], d["cache"])
    if d["dataset"] == "synthetic":
        return synthetic(d["train_size"], d["test_size"], d["seed"])
    if d["dataset"] in ("cifar10", "cifar100"):
        return cifar(d["dataset"], d["root"], d["download"])
    if d["dataset"] == "npz":
        return npz(d["path"])
    raise DataError(f"{d['dataset']} is not a tensor dataset")


class TensorBatches:
    """Global batch k of a uint8 tensor dataset, normalised and (optionally) augmented."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, mean, std, augment: bool, seed: int,
                 device: torch.device, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise DataError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        if len(x) < batch_size:
            raise DataError(f"the training set has {len(x)} images, fewer than one batch of {batch_size}: "
                            f"lower train.batch_size or use more data")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self.rank, self.world, self.device = rank, world, device
        self.mean, self.std = normalizer(mean, std, device)
        self.steps_per_epoch = len(x) // batch_size  # the last partial batch is dropped
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = to_device(torch.randperm(len(self.x), generator=g), self.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        epoch, pos = divmod(k, self.steps_per_epoch)
        idx = self._permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
        local = self.batch_size // self.world
        idx_local = idx[self.rank * local:(self.rank + 1) * local]
        x = self.x[idx_local].float()
        if self.augment:
            x = self._augment(x, k)
        return (x - self.mean) / self.std, self.y[idx_local]

    def _augment(self, x: Tensor, k: int) -> Tensor:
        # Random draws for the whole global batch, then this rank's slice: identical to one process.
        g = torch.Generator().manual_seed(self.seed * 7_368_787 + k)
        B = self.batch_size
        off = torch.randint(0, 9, (B, 2), generator=g)
        flip = torch.rand(B, generator=g) < 0.5
        local = B // self.world
        sl = slice(self.rank * local, (self.rank + 1) * local)
        off, flip = to_device(off[sl], x.device), to_device(flip[sl], x.device)
        n, c, h, w = x.shape
        xp = F.pad(x, (4, 4, 4, 4))  # zero (black) padding on the 0-255 scale, as torchvision
        rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (n, h)
        cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(n, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
        return out.permute(0, 3, 1, 2).contiguous()

    def test_batches(self, x: Tensor, y: Tensor, batch_size: int):
        return normalized_batches(x, y, batch_size, self.mean, self.std, self.device)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to `device` without making the host wait for the GPU: a plain .to()
    from pageable memory synchronises the stream, a pinned non-blocking copy does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def normalizer(mean, std, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (0-1 scale) as (1, 3, 1, 1) tensors on the 0-255 scale of uint8 images."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalized_batches(x: Tensor, y: Tensor, batch_size: int, mean: Tensor, std: Tensor, device: torch.device):
    """Evaluation batches of uint8 images, normalised with `normalizer`'s tensors."""
    x, y = x.to(device), y.to(device)
    for i in range(0, len(x), batch_size):
        yield (x[i:i + batch_size].float() - mean) / std, y[i:i + batch_size]


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


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)
