"""`asl plot-shifts`: the learned shifts of a run (paper Fig. 3) or how far several runs' shifts
travelled."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .app import app, console, err, fail, fmt, show


@app.command(name="plot-shifts")
def plot_shifts(
    targets: Optional[List[Path]] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT]...",
                                                   help="A run folder (last checkpoint and shifts.csv) or a checkpoint "
                                                        "(default: the newest run under ./runs with learned shifts); several "
                                                        "run folders: compare how far their shifts travelled."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default results/shifts/<name>, or "
                                       "results/shift_travel for several runs)."),
    beside: Optional[List[Path]] = typer.Option(None, "--beside", metavar="CSV", help="A shift_travel.csv of an earlier "
                                                "comparison (repeatable): its runs are drawn and listed beside these, e.g. "
                                                "runs whose folders are gone."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into the output folder even where it holds results "
                                   "committed to git (by default the files then go to <folder>.local beside it)."),
) -> None:
    """Scatter every ASL layer's shifts (paper Fig. 3), their movement in training and how far they
    travelled (shift_travel.csv: per layer and step, the mean distance from the start, the spread
    and the share beyond 1 px), and per-layer statistics. Given several run folders, one table and
    figure of their travel against steps, against the shift budget (the sum of per-step shift
    learning rates) and against the random-walk length (the square root of their squares' sum).

    Examples: asl plot-shifts; asl plot-shifts runs/A runs/B; asl plot-shifts runs/A --beside
    results/shift_travel_cifar10/shift_travel.csv --out results/shift_travel_64k"""
    from asl_cli.experiments.bench import results_dir
    from asl_cli.experiments.outputs import writable_dir
    from asl_cli.experiments.plot_shifts import compare, newest_run, run

    if beside and not targets:
        fail("--beside draws earlier runs beside a run folder: give the run folder too", code=2)
    if targets and (len(targets) > 1 or beside):
        where = writable_dir(out or results_dir() / "shift_travel", overwrite)
        if where.note:
            console.print(f"[yellow]note:[/] {where.note}", highlight=False)
        res = compare(list(targets), where.path, list(beside or []))
        last = res["table"].groupby("run", sort=False).tail(1)
        t = Table(title="shift travel at each run's end")
        for c in ("run", "steps", "shift x lr", "budget px", "walk px", "travel px", "spread", "beyond 1 px", "test top-1"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for _, r in last.iterrows():
            t.add_row(r["run"], str(r["step"]), f"{r['shift_lr_mult']:g}", f"{r['shift_budget_px']:.2f}", f"{r['shift_walk_px']:.3f}",
                      f"{r['mean_travel']:.3f}",
                      f"{r['spread']:.3f}", f"{100 * r['share_beyond_1px']:.1f}%", fmt(r["final_test_top1"]))
        show(t)
        for f in res["files"]:
            console.print(f"wrote {f}")
        return
    target = targets[0] if targets else None
    if target is None:
        target, why = newest_run(Path("runs"))
        console.print(why, highlight=False)
    where = writable_dir(out or results_dir() / "shifts" / (target.stem if target.is_file() else target.name), overwrite)
    res = run(target, where.path)
    for note in res["notes"]:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    if where.note:
        console.print(f"[yellow]note:[/] {where.note}", highlight=False)
    st = res["stats"]
    t = Table(title=f"shift statistics ({len(st)} layers)")
    for c in ("layer", "channels", "mean |shift|", "max |shift|", "beyond 1 px"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for _, r in st.iterrows():
        t.add_row(r["layer"], str(r["channels"]), f"{r['mean_abs_shift']:.3f}", f"{r['max_abs_shift']:.3f}", f"{100 * r['share_beyond_1px']:.1f}%")
    show(t)
    for f in res["files"]:
        console.print(f"wrote {f}")
