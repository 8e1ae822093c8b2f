"""Matplotlib helpers: headless backend, PNG + SVG side by side."""
from __future__ import annotations

from pathlib import Path


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, stem: Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]  # a stem may hold dots (x.local)
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    plt().close(fig)
    return paths
