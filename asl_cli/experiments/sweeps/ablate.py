"""`asl ablate`: the GS/SI/SR/TR shift variants of one recipe (paper Table 4), each over seeds: the
shift-variant preset of `asl sweep` (axis model.args.shift_mode, seeds also seeding the shifts)."""
from __future__ import annotations

from pathlib import Path

from ...config import ConfigError
from ...nn import SHIFT_MODES
from ...zoo import create_model
from .sweep import Axis, plan

VARIANTS = ("GS", "SI", "SR", "TR")  # paper Table 4: what --variant all trains
EXTRA_VARIANTS = ("TN",)  # learned from SR's N(0,1) start: initialisation vs learning
SEED_KEYS = ("train.seed", "model.args.shift_seed")
PAPER_LABEL = "paper Table 4 (AS-ResNet-w32, ImageNet)"


def parse_variants(text: str) -> list[str]:
    chosen = list(VARIANTS) if text.strip().lower() == "all" else [v.strip().upper() for v in text.split(",") if v.strip()]
    bad = [v for v in chosen if v not in VARIANTS + EXTRA_VARIANTS]
    if bad or not chosen:
        raise ConfigError(f"--variant must be GS, SI, SR, TR (or TN: learned from SR's start), a comma list of them, or all; got {text!r}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--variant names a variant twice ({text}); each variant is one cell, use --seeds for repeats")
    return chosen


def pick_baseline(baseline: str | None, chosen: list[str]) -> str:
    """The cell the others are compared with: the one asked for (which must be trained), else TR
    when it is trained, else the last variant."""
    if baseline is None:
        return "TR" if "TR" in chosen else chosen[-1]
    if baseline.strip().upper() not in chosen:
        raise ConfigError(f"--baseline {baseline!r} is not among the variants trained ({', '.join(chosen)})")
    return baseline.strip().upper()


def plan_variants(recipe: str, variants: list[str], seeds: int, overrides: list[str], root: Path):
    runs = plan(recipe, overrides, [Axis("model.args.shift_mode", variants)], seeds, root, SEED_KEYS)
    cfg = runs[0].cfg
    from ...nn import shift_layers

    try:
        model = create_model(cfg["model"]["name"], **cfg["model"]["args"])
    except TypeError as e:
        raise ConfigError(f"model {cfg['model']['name']} has no shift variants to ablate ({e})") from None
    if not list(shift_layers(model)):
        raise ConfigError(f"model {cfg['model']['name']} (args {cfg['model']['args']}) has no active shift layers: nothing to ablate")
    return runs


def variant_columns(summary):
    """Table 4's columns beside the sweep summary."""
    summary = summary.rename(columns={"model.args.shift_mode": "variant"}).drop(columns=["cell"])
    summary.insert(1, "shifting_domain", [SHIFT_MODES[v][0] for v in summary["variant"]])
    summary.insert(2, "initialisation", [SHIFT_MODES[v][1] for v in summary["variant"]])
    summary.insert(3, "learned", [SHIFT_MODES[v][2] for v in summary["variant"]])
    return summary
