"""`asl config`, `asl train` and `asl eval`: one run of a recipe, with a live progress display."""
from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .app import Runtime, app, console, fail, recipes_epilog, show, split_recipe


class Split(str, Enum):
    test = "test"
    train = "train"


class EvalForm(str, Enum):
    eager = "eager"
    inference = "inference"


@app.command(epilog=recipes_epilog())
def config(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="A recipe name in recipes/ or a YAML path (default: quick), then dotted overrides."),
    plain: bool = typer.Option(False, "--plain", help="Only the YAML (as written into a run folder's config.yaml), no comments."),
) -> None:
    """Print a recipe resolved with its overrides, every key with its default and allowed values."""
    from asl_cli.config import DEFAULT_RECIPE, describe, dump, load_config

    recipe, overrides = split_recipe(args)
    cfg = load_config(recipe or DEFAULT_RECIPE, overrides)
    if not plain:
        print(f"# {cfg['_source']}" + (f" with {' '.join(overrides)}" if overrides else ""))
    print(dump(cfg) if plain else describe(cfg), end="")


@app.command(epilog=recipes_epilog())
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="A recipe name in recipes/ or a YAML path (default: quick), then dotted overrides such as optim.lr=0.05 data.root=/data."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint, "
                                          "with its own config.yaml (overrides may change only paths and logging, e.g. data.path=...)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this checkpoint or run folder (fine-tuning)."),
) -> None:
    """Train a zoo model from a YAML recipe; writes a run folder (config, metrics.csv, checkpoints, shifts)."""
    import os

    from asl_cli.config import DEFAULT_RECIPE, load_config
    from asl_cli.train import RunFolder
    from asl_cli.train import train as run_training

    recipe, overrides = split_recipe(args)
    cfg = RunFolder(resume).resume_config(recipe, overrides) if resume is not None else load_config(recipe or DEFAULT_RECIPE, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    summary = train_with_progress(run_training, cfg, resume, init_from, show=main_rank)
    if main_rank:
        _render_summary(summary)


def train_with_progress(run_training, cfg, resume, init_from, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    from asl_cli.train import Callbacks

    if not show:
        return run_training(cfg, resume=resume, init_from=init_from)
    # In a narrow terminal the statistics are cut short, never the step count or the times.
    progress = Progress(TextColumn("[bold]train"), BarColumn(bar_width=12),
                        MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=2 * len(str(cfg["train"]["iterations"] or 0)) + 1)),
                        TextColumn("{task.fields[stats]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, expand=False)
    task = {}

    def on_start(info):
        console.print(f"run folder: [bold]{info['run_dir']}[/]  model {info['model']} on {info['device']}"
                      f" x{info['world']}  ({info['steps_per_epoch']} steps/epoch"
                      f"{', channels_last' if info['channels_last'] else ''}"
                      f"{', {} BatchNorm-ReLU pairs fused'.format(info['fused_bn_relu']) if info['fused_bn_relu'] else ''})")
        if info["malloc"] != "default":
            console.print(f"host memory: {info['malloc']} (train.malloc_pad_mib)", highlight=False)
        if cfg["optim"]["shift_lr_reference_iterations"]:
            console.print(f"shift learning rate: {info['shift_lr_mult']:.4g} x lr (optim.shift_lr_mult "
                          f"{cfg['optim']['shift_lr_mult']:g} x sqrt({cfg['optim']['shift_lr_reference_iterations']} / "
                          f"{cfg['train']['iterations']} iterations))", highlight=False)
        if info["start"] >= info["total"]:
            console.print(f"this run finished at step {info['total']}: nothing left to train")
        elif info["start"] > 0:
            console.print(f"resuming from the checkpoint at step {info['start']} of {info['total']}")
        task["id"] = progress.add_task("train", total=info["total"], completed=info["start"], stats="")

    def on_step(step, total, st):
        stats = f"loss {st['loss']:.3f}  top1 {st['top1']:.1f}%  lr {st['lr']:.3g}  {st['images_per_s']:.0f} img/s"
        progress.update(task["id"], completed=step, stats=stats)
        if not console.is_terminal:  # a log file gets no live bar: one line per log interval instead
            console.print(f"step {step:>7}/{total}  {stats}", highlight=False)

    def on_note(text):
        progress.console.print(text, highlight=False)

    def on_eval(row):
        progress.console.print(f"step {row['step']:>7}  test top1 {row['test_top1']:.2f}%  top5 {row['test_top5']:.2f}%  "
                               f"loss {row['test_loss']:.4f}  ({row['images_per_s']:.0f} img/s)")

    with progress:
        return run_training(cfg, resume=resume, init_from=init_from, callbacks=Callbacks(on_start, on_step, on_eval, on_note))


def _render_summary(summary: dict) -> None:
    last = summary.get("last") or {}
    t = Table(title="training summary", show_header=False)
    t.add_row("run folder", summary["run_dir"])
    t.add_row("steps", str(summary["steps"]))
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5"):
        if k in last:
            t.add_row(k, f"{last[k]:.4f}")
    t.add_row("best test top1", f"{summary['best_top1']:.2f}")
    show(t)


@app.command(name="eval")
def eval_(
    target: Path = typer.Argument(..., metavar="RUN_DIR|CHECKPOINT", help="A run folder (uses checkpoints/best.pt) or a checkpoint file."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Data overrides, e.g. data.root=/data."),
    split: Split = typer.Option(Split.test, "--split", help="Which split to evaluate."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    csv: Path = typer.Option(Path("results/eval.csv"), "--csv", help="CSV the result row is appended to."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip the latency measurements."),
    form: EvalForm = typer.Option(EvalForm.eager, "--form", help="eager, or inference (BatchNorm folded, shift fused into the 1x1 conv)."),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help="torch, or onnxruntime: the model exported to standard ONNX "
                                "(asl export) and run in ONNX Runtime's CPU provider, for both accuracy and latency."),
) -> None:
    """Top-1/top-5, loss, parameters, MACs and latency of a checkpoint; appends one CSV row.
    A checkpoint whose outputs are not finite (a diverged run) is an error (exit status 1) and
    appends no row."""
    from asl_cli.experiments.bench import append_csv
    from asl_cli.experiments.evaluation.evaluate import run

    row = run(target, split.value, device, not no_latency, tuple(overrides or ()), form.value, runtime.value)
    t = Table(title=f"eval: {row['model']} ({row['dataset']} {split.value})", show_header=False)
    for k in ("checkpoint", "step", "top1", "top5", "loss", "nonfinite_outputs", "params", "macs", "cpu_ms_batch1", "gpu_ms_batch1",
              "gpu_images_per_s_batch256"):
        if k in row:
            t.add_row(k, str(row[k]))
    show(t)
    if row["nonfinite_outputs"] or not math.isfinite(row["loss"]):
        fail(f"{row['checkpoint']} gives non-finite outputs for {row['nonfinite_outputs']} images (loss {row['loss']}): "
             f"its weights have diverged; no row was appended to {csv}")
    append_csv([row], csv)
    console.print(f"appended to {csv}")
