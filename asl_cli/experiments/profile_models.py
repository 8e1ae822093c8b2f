"""`asl profile --model`: parameters, MACs and latency of zoo models or checkpoints measured in
one run (paper Table 5 and Fig. 4), with top-1 from results/eval.csv where a trained run exists."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .. import checkpoint as ckpt_io
from ..zoo import PAPER, count_macs, count_parameters, create_model, get_entry, list_models
from . import figures
from .bench import model_latency, provenance, results_dir

PAIRS = [("as_resnet_w68", "mobilenet_v2_x1.0"), ("as_resnet_w50", "mobilenet_v2_x0.75"), ("as_resnet_w32", "mobilenet_v2_x0.5")]


def _load(spec: str):
    """(label, zoo name, model) for a zoo name or a checkpoint path."""
    if spec in list_models():
        torch.manual_seed(0)
        return spec, spec, create_model(spec)
    p = Path(spec)
    if p.exists():
        ck = ckpt_io.load(p)
        return str(p), ck["model_name"], ckpt_io.build_model(ck)
    get_entry(spec)  # raises KeyError with suggestions
    raise KeyError(spec)


def measured_top1(name: str, eval_csv: Path) -> float | None:
    if not eval_csv.exists():
        return None
    df = pd.read_csv(eval_csv)
    df = df[(df["model"] == name) & (df.get("split", "test") == "test")]
    if "dataset" in df:
        df = df[df["dataset"] == "imagenet"] if get_entry(name).dataset == "imagenet" else df
    return float(df["top1"].max()) if len(df) else None


def run(specs: list[str], device: str = "cpu", threads: int = 1, min_run_time: float = 1.0,
        eval_csv: Path | None = None) -> list[dict]:
    eval_csv = eval_csv or results_dir() / "eval.csv"
    rows = []
    for spec in specs:
        label, name, model = _load(spec)
        entry = get_entry(name)
        s = entry.input_size
        row = {"model": label, "arch": name, "params": count_parameters(model), "macs": count_macs(model, s), "input_size": s,
               **model_latency(model, s, device, threads, min_run_time)}
        paper = PAPER.get(name, {})
        row.update({"top1": measured_top1(name, eval_csv), "paper_top1": paper.get("top1"), "paper_params_m": paper.get("params_m"),
                    "paper_macs_m": paper.get("macs_m"), "paper_cpu_ms": paper.get("cpu_ms")})
        row.update(provenance(device, threads))
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """CPU latency ratios of the paper's AS-ResNet / MobileNetV2 pairs present in this run."""
    by = {r["arch"]: r for r in rows}
    out = []
    for a, b in PAIRS:
        if a in by and b in by:
            pa, pb = PAPER[a]["cpu_ms"], PAPER[b]["cpu_ms"]
            out.append({"pair": f"{a} / {b}", "ratio": by[a]["cpu_ms_batch1"] / by[b]["cpu_ms_batch1"], "paper_ratio": pa / pb})
    return out


def figure(rows: list[dict], stem: Path) -> list[Path]:
    """Top-1 against CPU latency (paper Fig. 4): measured top-1 where a run exists, else the paper's."""
    plt = figures.plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker, colour in (("as_resnet", "o", "tab:red"), ("mobilenet_v2", "s", "tab:blue")):
        pts = [r for r in rows if get_entry(r["arch"]).family == family]
        if not pts:
            continue
        xs = [r["cpu_ms_batch1"] for r in pts]
        ys = [r["top1"] if r["top1"] is not None else r["paper_top1"] for r in pts]
        ax.plot(xs, ys, marker=marker, color=colour, label=family.replace("_", "-"))
        for r, xv, yv in zip(pts, xs, ys):
            if yv is not None:
                src = "" if r["top1"] is not None else " (paper)"
                ax.annotate(r["arch"] + src, (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    others = [r for r in rows if get_entry(r["arch"]).family not in ("as_resnet", "mobilenet_v2")]
    for r in others:
        y = r["top1"] if r["top1"] is not None else r["paper_top1"]
        if y is not None:
            ax.scatter([r["cpu_ms_batch1"]], [y], color="gray")
            ax.annotate(r["arch"], (r["cpu_ms_batch1"], y), fontsize=7)
    r0 = rows[0]
    ax.set_xlabel(f"CPU latency, batch 1, {r0['threads']} thread(s) (ms)")
    ax.set_ylabel("ImageNet top-1 (%)")
    ax.set_title(f"Accuracy vs latency ({r0['device_name']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figures.save(fig, stem)
