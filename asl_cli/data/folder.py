"""`data.dataset=folder`: a folder of small images by class, decoded once into the uint8 tensors
that the CIFAR and npz sources use (so augmentation and batching stay on the training device).

Layout (torchvision's ImageFolder, one folder per split):

    DIR/train/<class>/*.png|jpg|...      DIR/test/<class>/...   (or DIR/val/<class>/...)

Every image must have the same size; greyscale, palette and RGBA images become RGB. The decoded
arrays are cached (keyed by the files' names, sizes and modification times), so the second run
starts at once; `data.cache` picks the folder (`auto`: $ASL_CACHE_DIR, else ~/.cache/asl) or turns
it off (`none`).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .tensors import DataError, TensorData, channel_stats
from .preprocess import WIDE_MODES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
CACHE_VERSION = 1


def _split_dir(root: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise DataError(f"folder dataset {root.resolve()}: no {' or '.join(names)} subfolder; expected "
                    f"{root.resolve()}/train/<class>/<image> and {root.resolve()}/test/<class>/<image>")


def _listing(split: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split.resolve()} has no class folders (expected {split.resolve()}/<class>/<image>)")
    files = []
    for label, c in enumerate(classes):
        found = sorted(p for p in (split / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"class folder {(split / c).resolve()} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    return classes, files


def _fingerprint(root: Path, files: list[tuple[Path, int]]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}:{root.resolve()}".encode())
    for p, label in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _decode(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format or path.suffix.lstrip(".").upper()
            if im.mode in WIDE_MODES:
                raise DataError(f"{path} is a {im.mode} image (more than 8 bits per channel); the folder source reads "
                                f"8-bit images only: convert it first")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot decode {path}: {e}") from None
    return arr, fmt


def _read_split(files: list[tuple[Path, int]], workers: int) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda f: _decode(f[0]), files, chunksize=256))
    shape = decoded[0][0].shape
    for (p, _), (arr, _) in zip(files, decoded):
        if arr.shape != shape:
            raise DataError(f"{p} is {arr.shape[1]}x{arr.shape[0]} but {files[0][0]} is {shape[1]}x{shape[0]}: "
                            f"the folder source needs images of one size")
    x = torch.from_numpy(np.stack([a for a, _ in decoded])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    return x, y, {fmt for _, fmt in decoded}


def cache_dir(setting) -> Path | None:
    """The cache folder for a `data.cache` setting: auto, none/false, or a path."""
    if setting in (None, False) or str(setting).lower() in ("none", "false", "off"):
        return None
    if setting in (True, "auto"):
        base = os.environ.get("ASL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asl"
        return Path(base)
    return Path(setting)


def image_folder(path: str | None, cache="auto", workers: int | None = None) -> TensorData:
    if not path:
        raise DataError("data.dataset=folder needs data.path=DIR (DIR/train/<class>/<image>, DIR/test/<class>/<image>)")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"folder dataset {root.resolve()} does not exist or is not a folder")
    train_dir, test_dir = _split_dir(root, ("train",)), _split_dir(root, ("test", "val"))
    classes, train_files = _listing(train_dir)
    test_classes, test_files = _listing(test_dir)
    if test_classes != classes:
        extra = sorted(set(test_classes) ^ set(classes))
        raise DataError(f"{train_dir} and {test_dir} have different class folders (differing: {', '.join(extra[:5])})")
    key = _fingerprint(root, train_files + test_files)
    folder = cache_dir(cache)
    cached = folder / f"folder-{root.resolve().name}-{key}.pt" if folder is not None else None
    obj = None
    if cached is not None and cached.exists():
        try:
            obj = torch.load(cached, weights_only=True)
        except Exception as e:  # a broken cache file is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable dataset cache {cached} ({e.__class__.__name__}); decoding the images again", stacklevel=2)
    if obj is None:
        workers = workers or min(8, os.cpu_count() or 1)
        xtr, ytr, f1 = _read_split(train_files, workers)
        xte, yte, f2 = _read_split(test_files, workers)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"{root}: train and test images differ in size: {tuple(xtr.shape[2:])} vs {tuple(xte.shape[2:])}")
        obj = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "classes": classes,
               "formats": sorted(f1 | f2)}
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".tmp-{os.getpid()}")
                torch.save(obj, tmp)
                os.replace(tmp, cached)
            except OSError as e:
                warnings.warn(f"could not write the dataset cache {cached} ({e}); the next run decodes the images again", stacklevel=2)
    mean, std = channel_stats(obj["x_train"])
    return TensorData(obj["x_train"], obj["y_train"], obj["x_test"], obj["y_test"], len(obj["classes"]), mean, std,
                      f"folder:{root.resolve().name}", "+".join(obj["formats"]) + " files")
