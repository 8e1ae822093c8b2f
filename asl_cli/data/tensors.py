"""Small-image datasets held as uint8 tensors, and their batches.

The images stay uint8 (on the training device when asked) and `TensorBatches` cuts global batch k
from them: the order and the augmentation (pad-4 random crop + horizontal flip) depend only on
(seed, k), which makes resuming exact and lets every distributed rank take its slice of the same
global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


from ..errors import DataError  # noqa: F401  (raised here; importable from here as before)


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
        x = self.x[idx_local]
        if self.augment:
            x = self._augment(x, k)  # on the uint8 images: a quarter of the bytes, the same values
        return x.float().sub_(self.mean).div_(self.std), self.y[idx_local]

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
        # zero (black) padding, as torchvision; every h x w window of the padded images as a view,
        # (n, c, 9, 9, h, w), of which each image takes the one at its offset
        windows = F.pad(x, (4, 4, 4, 4)).unfold(2, h, 1).unfold(3, w, 1)
        out = windows[torch.arange(n, device=x.device), :, off[:, 0], off[:, 1]]  # (n, c, h, w)
        return torch.where(flip[:, None, None, None], out.flip(-1), out)  # no host wait on a GPU

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


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)
