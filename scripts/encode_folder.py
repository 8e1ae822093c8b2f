"""Re-encode an image-folder dataset (DIR/<split>/<class>/<image>) as JPEG files of a given
quality, keeping the layout, e.g. to move CIFAR-10 to a machine that only takes a small upload:

    python scripts/encode_folder.py data/cifar10-png data/cifar10-jpg75 --quality 75

The encoding is lossy: name the variant in any result made from it (the folder source records
the file format in each run's `encoding`)."""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def encode(src: Path, dst: Path, quality: int) -> None:
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").save(dst, "JPEG", quality=quality)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--quality", type=int, default=75, help="JPEG quality, 1-95 (default 75)")
    a = p.parse_args(argv)
    if not 1 <= a.quality <= 95:
        p.error(f"--quality must be in 1..95, got {a.quality}")
    if not a.src.is_dir():
        p.error(f"{a.src} is not a folder")
    jobs = [(f, a.dst / f.relative_to(a.src).with_suffix(".jpg")) for f in sorted(a.src.rglob("*"))
            if f.suffix.lower() in SUFFIXES and f.is_file()]
    if not jobs:
        p.error(f"{a.src} holds no images")
    for d in {d.parent for _, d in jobs}:
        d.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda j: encode(j[0], j[1], a.quality), jobs))
    size = sum(d.stat().st_size for _, d in jobs)
    print(f"wrote {len(jobs)} JPEG files (quality {a.quality}, {size / 2**20:.1f} MiB) under {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
