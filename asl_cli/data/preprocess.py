"""Turning image files into model inputs, as each checkpoint's recorded preprocessing says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


from ..errors import ImageError  # noqa: F401  (raised here; importable from here as before)


# PIL modes with more than 8 bits per channel: converting them to RGB saturates or blackens them
WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            if im.mode in WIDE_MODES:
                raise ImageError(f"{p} is a {im.mode} image (more than 8 bits per channel); converting it to 8-bit RGB "
                                 f"would clip or darken it, so it is refused: convert it to an 8-bit image first")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read image {p}: {e}") from None


def _resize_crop(img, resize: int | tuple[int, int], crop: int) -> np.ndarray:
    from PIL import Image

    size = (resize, resize) if isinstance(resize, int) else tuple(resize)
    img = img.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)  # H x W x 3, RGB, 0-255
    top, left = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
    return a[top:top + crop, left:left + crop]


def to_input(img, prep: dict) -> Tensor:
    """A (1, 3, H, W) float tensor for one PIL image."""
    kind = prep.get("kind")
    if kind == "caffe":  # resize to 256x256, center crop, BGR, minus mean, times scale (0-255 scale)
        a = _resize_crop(img, prep["resize"], prep["crop"])[:, :, ::-1]
        a = (a - np.asarray(prep["mean"], np.float32)) * np.float32(prep["scale"])
    elif kind == "imagenet":
        a = _resize_crop(img, prep["resize"], prep["crop"]) / 255.0
        a = (a - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    elif kind == "tensor":
        s = prep["input_size"]
        a = _resize_crop(img, s, s) / 255.0
        a = (a - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    else:
        raise ImageError(f"unknown preprocessing {kind!r} in the checkpoint")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


class FolderTransform:
    """A picklable ImageFolder transform that applies a checkpoint's preprocessing."""

    def __init__(self, prep: dict):
        self.prep = prep

    def __call__(self, img) -> Tensor:
        return to_input(img.convert("RGB"), self.prep)[0]
