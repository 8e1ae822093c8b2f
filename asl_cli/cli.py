"""The `asl` command line: parses arguments, calls the library, renders results with rich."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="asl",
    help="Active shift layer (Jeon & Kim, NeurIPS 2018): train, evaluate, ablate and profile the paper's networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def not_available(command: str) -> None:
    fail(f"`asl {command}` is not available in this version yet.", code=2)


@app.command()
def info() -> None:
    """Print versions and which implementation serves CPU and CUDA tensors."""
    import torch

    import asl_cli
    from asl_cli.ops import backends

    table = Table(title="asl", show_header=False)
    table.add_row("asl", asl_cli.__version__)
    table.add_row("torch", torch.__version__)
    table.add_row("CUDA (torch build)", torch.version.cuda or "none")
    table.add_row("GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")
    for key, value in backends().items():
        table.add_row(f"backend: {key}", value)
    console.print(table)


def _render_op_rows(rows: list[dict], device: str) -> None:
    from asl_cli.experiments.profile_op import CPU_TARGETS, CUDA_TARGETS

    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        t = Table(title=f"{case} on {rs[0]['device_name']} ({rs[0]['threads']} thread(s))" if device == "cpu" else f"{case} on {rs[0]['device_name']}")
        t.add_column("op")
        t.add_column("pass")
        t.add_column("ms", justify="right")
        t.add_column("GB/s", justify="right")
        for r in rs:
            gbs = r["gb_per_s"]
            t.add_row(r["op"], r["pass"], f"{r['ms']:.4g}", "" if gbs is None or gbs != gbs else f"{gbs:.1f}")
        console.print(t)
        r0 = rs[0]
        targets = CPU_TARGETS if device == "cpu" else CUDA_TARGETS
        lines = [
            ("forward / ReLU", r0["fwd_vs_relu"], targets.get("fwd_vs_relu")),
            ("forward / copy", r0["fwd_vs_copy"], targets.get("fwd_vs_copy")),
            ("fwd+bwd / copy", r0["fwdbwd_vs_copy"], targets.get("fwdbwd_vs_copy")),
            ("fwd+bwd / 3x3 depthwise fwd+bwd", r0["fwdbwd_vs_dw3"], targets.get("fwdbwd_vs_dw3")),
            ("grid_sample ASL / ours, forward", r0["grid_sample_speedup_fwd"], None),
            ("grid_sample ASL / ours, fwd+bwd", r0["grid_sample_speedup_fwdbwd"], None),
        ]
        for name, value, target in lines:
            verdict = ""
            if target is not None:
                verdict = f"  target <= {target}: " + ("[green]met[/]" if value <= target else "[red]missed[/]")
            console.print(f"  {name}: [bold]{value:.3f}x[/]{verdict}")


@app.command()
def profile(
    op: Optional[str] = typer.Option(None, "--op", help="Benchmark an operator against its peers: 'asl'."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Per-layer timing and FLOPs (paper Table 1): dw3|pw|bn|relu|add|asl|all."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Zoo models to compare (paper Table 5)."),
    train_speed: Optional[str] = typer.Option(None, "--train-speed", help="Training images/s of this zoo model with ASL vs 3x3 depthwise blocks (paper Table 2)."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size for --train-speed."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads (the paper uses one)."),
    min_run_time: float = typer.Option(1.0, "--min-run-time", min=0.01, help="Seconds of timing per measurement."),
    out: Optional[Path] = typer.Option(None, "--out", help="CSV to append to (default results/profile_op_<device>.csv)."),
) -> None:
    """Measure speed against peers timed in the same run; print ratios and append a CSV."""
    if op is None and layer is None and not model and train_speed is None:
        fail("say what to profile: --op asl, --layer NAME, --model NAME or --train-speed MODEL", code=2)
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}", code=2)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA device is visible")
    if train_speed is not None:
        return _profile_train_speed(train_speed, batch, device, threads, min_run_time, out)
    if layer is not None or model:
        not_available("profile --layer/--model")
    if op != "asl":
        fail(f"unknown --op {op!r}; the only operator is 'asl'", code=2)
    from rich.progress import Progress

    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.profile_op import default_cases, run

    cases = default_cases(device)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("timing", total=len(cases))

        def step(label):
            bar.update(task, description=f"timing {label}", advance=0)

        try:
            rows = []
            for case in cases:
                step(case.label)
                rows += run(device, threads, [case], min_run_time)
                bar.advance(task)
        except RuntimeError as e:
            fail(str(e))
    _render_op_rows(rows, device)
    path = out or REPO / "results" / f"profile_op_{device}.csv"
    append_csv(rows, path)
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_train_speed(model: str, batch: int, device: str, threads: int, min_run_time: float, out: Optional[Path]) -> None:
    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.train_speed import run
    from asl_cli.zoo import get_entry

    try:
        entry = get_entry(model)
    except KeyError as e:
        fail(e.args[0], code=2)
    if entry.family not in ("asnet", "as_resnet"):
        fail(f"--train-speed compares spatial blocks of asnet/as_resnet models; {model} is {entry.family}", code=2)
    with console.status(f"timing training steps of {model} (asl, dw3_bn, dw3) on {device}"):
        rows = run(model, batch=batch, device=device, threads=threads if device == "cpu" else None,
                   amp=device == "cuda", channels_last=device == "cuda", min_run_time=max(min_run_time, 1.0))
    t = Table(title=f"training throughput, {model}, batch {batch}, {rows[0]['device_name']}")
    for c in ("block", "ms/step", "images/s", "ASL speed-up"):
        t.add_column(c, justify="right" if c != "block" else "left")
    for r in rows:
        t.add_row(r["spatial"], f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.0f}", f"{r['speedup_of_first']:.2f}x")
    console.print(t)
    path = out or REPO / "results" / f"train_speed_{device}.csv"
    append_csv(rows, path)
    console.print(f"appended {len(rows)} rows to {path} (paper: ASL trains 1.54x faster than 1B-DW3-B-1)")


@app.command()
def zoo(
    family: Optional[str] = typer.Option(None, "--family", help="Only this family: asnet, shiftresnet, as_resnet, mobilenet_v2."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the table to this CSV."),
) -> None:
    """List the model zoo with parameters and MACs (FlopCounterMode) beside the paper's figures."""
    from asl_cli.zoo import list_models, model_summary

    names = list_models(family)
    if not names:
        fail(f"no models in family {family!r}; families: asnet, shiftresnet, as_resnet, mobilenet_v2", code=2)
    rows = [model_summary(n) for n in names]
    t = Table(title="asl model zoo")
    for col in ("model", "dataset", "input", "params (M)", "paper", "MACs (M)", "paper"):
        t.add_column(col, justify="left" if col in ("model", "dataset") else "right")
    for r in rows:
        t.add_row(r["name"], r["dataset"], f"{r['input_size']}", f"{r['params'] / 1e6:.4f}", _fmt(r["paper_params_m"]),
                  f"{r['macs'] / 1e6:.1f}", _fmt(r["paper_macs_m"]))
    console.print(t)
    if csv is not None:
        import pandas as pd

        csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(csv, index=False)
        console.print(f"wrote {csv}")


def _fmt(v) -> str:
    return "" if v is None else f"{v:g}"


def _split_recipe(args: list[str]) -> tuple[Optional[str], list[str]]:
    """The first argument without '=' is the recipe; the rest are key=value overrides."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.command()
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="A recipe name in recipes/ or a YAML path (default: quick), then dotted overrides such as optim.lr=0.05 data.root=/data."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this checkpoint or run folder (fine-tuning)."),
) -> None:
    """Train a zoo model from a YAML recipe; writes a run folder (config, metrics.csv, checkpoints, shifts)."""
    from asl_cli import checkpoint as ckpt_io
    from asl_cli.config import ConfigError, load_config
    from asl_cli.data import DataError
    from asl_cli.engine import Interrupted, NonFiniteLoss, TrainingError
    from asl_cli.engine import train as run_training

    recipe, overrides = _split_recipe(args)
    try:
        if resume is not None:
            if recipe or overrides:
                fail("--resume continues the run's own recipe (its config.yaml); give no recipe or overrides", code=2)
            if not (resume / "config.yaml").exists():
                fail(f"{resume} is not a run folder (no config.yaml)", code=2)
            cfg = load_config(str(resume / "config.yaml"))
        else:
            cfg = load_config(recipe or "quick", overrides)
    except ConfigError as e:
        fail(str(e), code=2)
    import os

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = _train_with_progress(run_training, cfg, resume, init_from, show=main_rank)
    except Interrupted as e:
        fail(f"{e}. Resume with: asl train --resume {e.run_dir}", code=130)
    except NonFiniteLoss as e:
        fail(str(e), code=3)
    except (TrainingError, DataError, ckpt_io.CheckpointError, ConfigError) as e:
        fail(str(e))
    if main_rank:
        _render_summary(summary)


def _train_with_progress(run_training, cfg, resume, init_from, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from asl_cli.engine import Callbacks

    if not show:
        return run_training(cfg, resume=resume, init_from=init_from)
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = {}

    def on_start(info):
        console.print(f"run folder: [bold]{info['run_dir']}[/]  model {info['model']} on {info['device']}"
                      f" x{info['world']}  ({info['steps_per_epoch']} steps/epoch)")
        task["id"] = progress.add_task("train", total=info["total"], completed=info["start"], stats="")

    def on_step(step, total, st):
        progress.update(task["id"], completed=step,
                        stats=f"loss {st['loss']:.3f}  top1 {st['top1']:.1f}%  lr {st['lr']:.3g}  {st['images_per_s']:.0f} img/s")

    def on_eval(row):
        progress.console.print(f"step {row['step']:>7}  test top1 {row['test_top1']:.2f}%  top5 {row['test_top5']:.2f}%  "
                               f"loss {row['test_loss']:.4f}  ({row['images_per_s']:.0f} img/s)")

    with progress:
        return run_training(cfg, resume=resume, init_from=init_from, callbacks=Callbacks(on_start, on_step, on_eval))


def _render_summary(summary: dict) -> None:
    last = summary.get("last") or {}
    t = Table(title="training summary", show_header=False)
    t.add_row("run folder", summary["run_dir"])
    t.add_row("steps", str(summary["steps"]))
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5"):
        if k in last:
            t.add_row(k, f"{last[k]:.4f}")
    t.add_row("best test top1", f"{summary['best_top1']:.2f}")
    console.print(t)


@app.command(name="eval")
def eval_(
    target: Path = typer.Argument(..., metavar="RUN_DIR|CHECKPOINT", help="A run folder (uses checkpoints/best.pt) or a checkpoint file."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Data overrides, e.g. data.root=/data."),
    split: str = typer.Option("test", "--split", help="test or train."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    csv: Path = typer.Option(Path("results/eval.csv"), "--csv", help="CSV the result row is appended to."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip the latency measurements."),
) -> None:
    """Top-1/top-5, loss, parameters, MACs and latency of a checkpoint; appends one CSV row."""
    from asl_cli import checkpoint as ckpt_io
    from asl_cli.config import ConfigError
    from asl_cli.data import DataError
    from asl_cli.experiments.bench import append_csv
    from asl_cli.experiments.evaluate import run

    if split not in ("test", "train"):
        fail(f"--split must be test or train, got {split!r}", code=2)
    try:
        row = run(target, split, device, not no_latency, tuple(overrides or ()))
    except (ckpt_io.CheckpointError, ConfigError, DataError) as e:
        fail(str(e))
    t = Table(title=f"eval: {row['model']} ({row['dataset']} {split})", show_header=False)
    for k in ("checkpoint", "step", "top1", "top5", "loss", "params", "macs", "cpu_ms_batch1", "gpu_ms_batch1", "gpu_images_per_s_batch256"):
        if k in row:
            t.add_row(k, str(row[k]))
    console.print(t)
    append_csv([row], csv)
    console.print(f"appended to {csv}")


@app.command(name="import-caffe")
def import_caffe(
    model_file: Path = typer.Argument(..., metavar="MODEL.caffemodel", help="The authors' trained AS-ResNet in Caffe's binary format."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Zoo architecture (default: from the file's base width, e.g. as_resnet_w32)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (default: checkpoints/<arch>-caffe.pt)."),
) -> None:
    """Convert a Caffe AS-ResNet model into a checkpoint for eval, predict, profile, plot-shifts and fine-tuning."""
    from asl_cli.caffe import CaffeFormatError
    from asl_cli.experiments.import_caffe import ImportError_, import_model, to_checkpoint

    try:
        model, report = import_model(model_file, arch)
    except (CaffeFormatError, ImportError_) as e:
        fail(str(e))
    except (KeyError, TypeError) as e:
        fail(f"--arch: {e.args[0]}", code=2)
    path = to_checkpoint(model, report, out or Path("checkpoints") / f"{report['arch']}-caffe.pt")
    t = Table(title=f"imported {model_file.name} as {report['arch']}", show_header=False)
    t.add_row("layers (with weights)", f"{report['layers']} ({report['weighted_layers']})")
    t.add_row("stored values", f"{report['values']:,}")
    for k, label in (("conv", "convolutions"), ("fc", "classifier"), ("shift", "shifts"), ("scale", "Scale (BN gamma, beta)"),
                     ("stale_bn", "stale BatchNorm statistics (set aside)")):
        t.add_row(f"  {label}", f"{report.get('values_' + k, 0):,}")
    t.add_row("checkpoint", str(path))
    console.print(t)


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint file or run folder."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files (any format Pillow reads)."),
    topk: int = typer.Option(5, "--topk", min=1, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Classify images with a checkpoint, using the preprocessing recorded in it."""
    import json

    from asl_cli import checkpoint as ckpt_io
    from asl_cli.experiments.predict import predict as run_predict
    from asl_cli.preprocess import ImageError

    try:
        rows = run_predict(checkpoint, images, topk)
    except (ckpt_io.CheckpointError, ImageError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        t = Table(title=r["image"])
        t.add_column("#", justify="right")
        t.add_column("class")
        t.add_column("probability", justify="right")
        for i, c in enumerate(r["top"], 1):
            t.add_row(str(i), c["class"], f"{c['probability']:.3f}")
        console.print(t)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate(ctx: typer.Context) -> None:
    """Train the GS/SI/SR/TR shift variants of one recipe (not available yet)."""
    not_available("ablate")


@app.command(name="plot-shifts", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plot_shifts(ctx: typer.Context) -> None:
    """Scatter the learned shifts of every ASL layer (not available yet)."""
    not_available("plot-shifts")


def main() -> None:
    app(prog_name="asl")


if __name__ == "__main__":
    main()
