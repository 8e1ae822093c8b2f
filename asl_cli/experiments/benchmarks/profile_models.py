"""`asl profile models`: parameters, MACs and latency of zoo models or checkpoints measured in one
run (paper Table 5 and Fig. 4), each in several forms (eager, the inference form, frozen
TorchScript, ...), with the fastest form of each model named; top-1 from results/eval.csv where a
trained run exists. The CPU's one-thread matrix-multiply rate is measured in the same run as the
reference for each model's multiply-accumulate rate."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ...errors import UnknownModel
from ...train import checkpoint as ckpt_io
from ...zoo import PAPER, count_macs, count_parameters, create_model, get_entry, list_models
from .. import figures
from ..bench import median_ms, model_latency, provenance, results_dir

PAIRS = [("as_resnet_w68", "mobilenet_v2_x1.0"), ("as_resnet_w50", "mobilenet_v2_x0.75"), ("as_resnet_w32", "mobilenet_v2_x0.5")]


def load_spec(spec: str):
    """(label, zoo name, model, checkpoint) for a zoo name (its seed-0 weights; no checkpoint) or
    a checkpoint path (its best checkpoint)."""
    if spec in list_models():
        torch.manual_seed(0)
        return spec, spec, create_model(spec), None
    p = Path(spec)
    if p.exists():
        ck = ckpt_io.load(p)
        return str(p), ck["model_name"], ckpt_io.build_model(ck), ck
    get_entry(spec)  # raises UnknownModel with suggestions
    raise UnknownModel(spec)


def measured_top1(name: str, eval_csv: Path) -> float | None:
    if not eval_csv.exists():
        return None
    df = pd.read_csv(eval_csv)
    df = df[(df["model"] == name) & (df.get("split", "test") == "test")]
    if "dataset" in df:
        df = df[df["dataset"] == "imagenet"] if get_entry(name).dataset == "imagenet" else df
    return float(df["top1"].max()) if len(df) else None


def blas_gmacs(threads: int, min_run_time: float = 0.5, n: int = 1024) -> float:
    """Multiply-accumulates per second of one float32 n x n x n matrix product on `threads` CPU
    threads: the practical peak the convolutions are compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return n ** 3 / median_ms(lambda: a @ b, threads=threads, min_run_time=min_run_time) / 1e6


def run(specs: list[str], device: str = "cpu", threads: int = 1, min_run_time: float = 1.0,
        eval_csv: Path | None = None, forms: tuple[str, ...] = ("eager",)) -> list[dict]:
    """One row per (model, form); `fastest` marks each model's quickest CPU form."""
    from ...inference import make_form

    eval_csv = eval_csv or results_dir() / "eval.csv"
    peak = blas_gmacs(threads)
    prov = provenance(device, threads)
    rows = []
    for spec in specs:
        label, name, model, _ = load_spec(spec)
        entry = get_entry(name)
        s = entry.input_size
        macs, params = count_macs(model, s), count_parameters(model)
        paper = PAPER.get(name, {})
        known = {"top1": measured_top1(name, eval_csv), "paper_top1": paper.get("top1"), "paper_params_m": paper.get("params_m"),
                 "paper_macs_m": paper.get("macs_m"), "paper_cpu_ms": paper.get("cpu_ms")}
        mine = []
        for form in forms:
            fm = make_form(model, form, torch.randn(1, 3, s, s))
            row = {"model": label, "arch": name, "form": form, "params": params, "macs": macs, "input_size": s,
                   **model_latency(fm, s, device, threads, min_run_time, copy_model=False)}
            row["cpu_gmacs_per_s"] = round(macs / row["cpu_ms_batch1"] / 1e6, 2)
            row["cpu_blas_gmacs_per_s"] = round(peak, 2)
            row.update(known)
            row.update(prov)
            mine.append(row)
        best = min(mine, key=lambda r: r["cpu_ms_batch1"])
        for r in mine:
            r["fastest"] = r is best
        rows += mine
    return rows


def fastest(rows: list[dict]) -> list[dict]:
    """Each model's fastest-form row."""
    return [r for r in rows if r.get("fastest", True)]


def ratios(rows: list[dict]) -> list[dict]:
    """CPU latency ratios of the paper's AS-ResNet / MobileNetV2 pairs present in this run: each
    model in its fastest form (and eager against eager where both were timed)."""
    out = []
    gpu = {}
    for r in rows:  # each model's form with the highest GPU throughput
        if r.get("gpu_images_per_s_batch256") and r["gpu_images_per_s_batch256"] > gpu.get(r["arch"], {}).get("gpu_images_per_s_batch256", 0):
            gpu[r["arch"]] = r
    for a, b in PAIRS:
        if a in gpu and b in gpu:
            out.append({"pair": f"{a} / {b}", "forms": f"{gpu[a]['form']} / {gpu[b]['form']}", "kind": "GPU images/s, batch 256 bf16",
                        "ratio": gpu[a]["gpu_images_per_s_batch256"] / gpu[b]["gpu_images_per_s_batch256"],
                        "macs_ratio": gpu[a]["macs"] / gpu[b]["macs"], "paper_ratio": PAPER[b]["gpu_ms"] / PAPER[a]["gpu_ms"]})
        for kind, pick in (("fastest", fastest(rows)), ("eager", [r for r in rows if r.get("form", "eager") == "eager"])):
            by = {r["arch"]: r for r in pick}
            if a in by and b in by:
                pa, pb = PAPER[a]["cpu_ms"], PAPER[b]["cpu_ms"]
                out.append({"pair": f"{a} / {b}", "forms": f"{by[a].get('form', 'eager')} / {by[b].get('form', 'eager')}",
                            "kind": kind, "ratio": by[a]["cpu_ms_batch1"] / by[b]["cpu_ms_batch1"],
                            "macs_ratio": by[a]["macs"] / by[b]["macs"], "paper_ratio": pa / pb})
    return out


def figure(rows: list[dict], stem: Path) -> list[Path]:
    """Top-1 against CPU latency (paper Fig. 4), each model in its fastest form: measured top-1
    where a run exists, else the paper's."""
    rows = fastest(rows)
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
    ax.set_xlabel(f"CPU latency, batch 1, {r0['threads']} thread(s), fastest form (ms)")
    ax.set_ylabel("ImageNet top-1 (%)")
    ax.set_title(f"Accuracy vs latency ({r0['device_name']}, {r0.get('runtime', 'PyTorch')})", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return figures.save(fig, stem)
