"""`asl ablate`: the GS/SI/SR/TR shift variants of one recipe (paper Table 4), each over seeds,
in run folders that are reused when finished and resumed when interrupted."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from .. import checkpoint as ckpt_io
from ..config import load_config
from ..engine import Dist, pick_device
from ..nn import SHIFT_MODES
from ..zoo import count_parameters
from ..zoo.paper import TABLE4
from .bench import provenance

VARIANTS = ("GS", "SI", "SR", "TR")


def variant_runs(recipe: str, variants: list[str], seeds: int, overrides: list[str], root: Path):
    for v in variants:
        for seed in range(seeds):
            run_dir = root / f"{v}-seed{seed}"
            cfg = load_config(recipe, list(overrides) + [f"model.args.shift_mode={v}", f"model.args.shift_seed={seed}",
                                                         f"train.seed={seed}", f"output.dir={run_dir}"])
            yield v, seed, run_dir, cfg


def run(recipe: str, variants: list[str], seeds: int, overrides: list[str], root: Path,
        train_one: Callable[[dict, Path | None], dict], on_status: Callable[[str], None] = lambda s: None) -> pd.DataFrame:
    """Trains what is missing (train_one(cfg, resume_dir_or_None)) and summarises every run."""
    results = []
    for v, seed, run_dir, cfg in variant_runs(recipe, variants, seeds, overrides, root):
        last = run_dir / "checkpoints" / "last.pt"
        done = None
        if last.exists():
            ck = ckpt_io.load(last)
            # a finished run's last checkpoint is its final evaluation (iterations or epochs alike)
            if ck.get("last_row") and ck["step"] >= ck.get("total_steps", float("inf")):
                done = ck
        if done is not None:
            on_status(f"{v} seed {seed}: finished earlier, reused ({run_dir})")
        else:
            resume = run_dir if last.exists() else None
            on_status(f"{v} seed {seed}: {'resuming' if resume else 'training'} in {run_dir}")
            if resume is None and run_dir.exists():
                for f in ("config.yaml", "metrics.csv", "shifts.csv"):
                    (run_dir / f).unlink(missing_ok=True)
            train_one(cfg, resume)
            done = ckpt_io.load(last)
        row = done["last_row"]
        results.append({"variant": v, "seed": seed, "top1": row["test_top1"], "top5": row["test_top5"],
                        "params": count_parameters(ckpt_io.build_model(done)), "run_dir": str(run_dir)})
    df = pd.DataFrame(results)
    out = []
    for v in variants:
        d = df[df["variant"] == v]
        domain, init, learned = SHIFT_MODES[v]
        out.append({"variant": v, "shifting_domain": domain, "initialisation": init, "learned": learned,
                    "top1_mean": round(d["top1"].mean(), 3), "top1_std": round(d["top1"].std(ddof=0), 3),
                    "top5_mean": round(d["top5"].mean(), 3), "top5_std": round(d["top5"].std(ddof=0), 3),
                    "seeds": len(d), "params": int(d["params"].iloc[0]), "paper_top1_as_resnet_w32_imagenet": TABLE4[v],
                    "recipe": recipe, "overrides": " ".join(overrides), "run_dirs": ";".join(d["run_dir"])})
    summary = pd.DataFrame(out)
    for k, val in provenance(str(pick_device(cfg["train"]["device"], Dist())), None).items():
        summary[k] = val
    return summary
