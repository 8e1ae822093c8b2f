"""A finished run's learning curve against a published figure, and one results row that says how it
was made.

    python scripts/learning_curve.py RUN_DIR --paper 89.14 --csv results/full_schedule_cifar10.csv \
        --figure results/full_schedule_cifar10/learning_curve

Reads the run folder only (config.yaml, metrics.csv, checkpoints/last.pt's step): test top-1 at
every evaluation, the final and best values, their distance to the paper's, the training time (the
sum of metrics.csv's per-interval seconds, evaluations excluded), images/s over it, and the wall
time from config.yaml's writing to the last checkpoint's. Appends one row to --csv and draws
--figure (PNG and SVG).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

import pandas as pd
import yaml

from asl_cli.experiments import figures
from asl_cli.experiments.bench import append_csv, provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--paper", type=float, required=True, help="the paper's top-1 for this model and schedule")
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--figure", type=Path, required=True, help="figure stem (PNG and SVG are written)")
    ap.add_argument("--label", default=None, help="the run's name in the figure and the CSV (default: the folder's)")
    ap.add_argument("--commit", default=None, help="the commit whose code trained the run (default: this checkout's)")
    ap.add_argument("--threads", type=int, default=None, help="the threads it trained on (default: this machine's cores)")
    ap.add_argument("--train-command", default="", help="the command that trained it")
    a = ap.parse_args()

    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    m = pd.read_csv(a.run / "metrics.csv")
    if m.empty:
        raise SystemExit(f"{a.run}/metrics.csv has no evaluation yet")
    label = a.label or a.run.name
    t = cfg["train"]
    best = m.loc[m["test_top1"].idxmax()]
    final = m.iloc[-1]
    train_s = float(m["seconds"].sum())
    ckpt = a.run / "checkpoints" / "last.pt"
    wall_s = os.path.getmtime(ckpt) - os.path.getmtime(a.run / "config.yaml")
    s, o, d = cfg["schedule"], cfg["optim"], cfg["data"]
    row = {"run": label, "model": cfg["model"]["name"], "shift_mode": cfg["model"]["args"].get("shift_mode", "TR"),
           "dataset": f"{d['dataset']}:{Path(str(d.get('path') or '')).name or d['dataset']}", "encoding": "PNG files" if d["dataset"] == "folder" else "",
           "iterations": t["iterations"], "steps_done": int(final["step"]), "batch": t["batch_size"], "lr": o["lr"],
           "schedule": f"{s['type']} {s['milestones']} x{s['gamma']}", "shift_lr_mult": o.get("shift_lr_mult"),
           "shift_lr_reference_iterations": o.get("shift_lr_reference_iterations"), "seed": t["seed"],
           "final_test_top1": float(final["test_top1"]), "best_test_top1": float(best["test_top1"]), "best_step": int(best["step"]),
           "paper_top1": a.paper, "final_minus_paper": round(float(final["test_top1"]) - a.paper, 2),
           "train_seconds": round(train_s, 1), "images_per_s": round(int(final["step"]) * t["batch_size"] / train_s, 1),
           "wall_seconds": round(wall_s, 1),
           "started": dt.datetime.fromtimestamp(os.path.getmtime(a.run / "config.yaml"), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "threads": a.threads or os.cpu_count(), **{k: v for k, v in provenance("cpu", None).items() if k != "threads"},
           "train_command": a.train_command}
    if a.commit:
        row["commit"] = a.commit
    append_csv([row], a.csv)

    plt = figures.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(m["step"], m["test_top1"], marker=".", label=f"{label}: test top-1")
    ax.axhline(a.paper, color="tab:red", linestyle="--", linewidth=1, label=f"paper: {a.paper:.2f}")
    for ms in s.get("milestones") or []:
        ax.axvline(ms, color="0.7", linewidth=0.8)
    ax.annotate(f"final {final['test_top1']:.2f}, best {best['test_top1']:.2f} (step {int(best['step'])})",
                (float(final["step"]), float(final["test_top1"])), xytext=(-10, -28), textcoords="offset points",
                ha="right", fontsize=8)
    ax.set_xlabel("training step (batch %d; grey lines: learning rate x%g)" % (t["batch_size"], s["gamma"]))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{row['model']}, {row['shift_mode']}, {row['dataset']} ({row['encoding']}), {t['iterations']} iterations",
                 fontsize=9)
    ax.grid(True, color="0.88")
    ax.legend(fontsize=8, loc="lower right")
    for f in figures.save(fig, a.figure):
        print("wrote", f)
    print(f"appended a row to {a.csv}: final {row['final_test_top1']:.2f}, best {row['best_test_top1']:.2f} at step "
          f"{row['best_step']}, paper {a.paper:.2f} ({row['final_minus_paper']:+.2f}); {row['images_per_s']} images/s "
          f"over {train_s / 3600:.2f} h of training, {wall_s / 3600:.2f} h wall")


if __name__ == "__main__":
    main()
