"""The `asl` command line: parses arguments, calls the library, renders results with rich."""
from __future__ import annotations

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
            *([("fwd+bwd as a CUDA-graph replay / copy", r0["fwdbwd_graph_vs_copy"], targets.get("fwdbwd_graph_vs_copy")),
               ("fwd+bwd / 3x3 depthwise fwd+bwd, both CUDA-graph replays", r0["fwdbwd_graph_vs_dw3"], targets.get("fwdbwd_graph_vs_dw3"))]
              if "fwdbwd_graph_vs_copy" in r0 else []),
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
    model: Optional[List[str]] = typer.Option(None, "--model", help="Zoo models or checkpoints to compare (paper Table 5); more may follow: --model a b c."),
    more: Optional[List[str]] = typer.Argument(None, metavar="[MODEL]...", help="Further models for --model."),
    train_speed: Optional[str] = typer.Option(None, "--train-speed", help="Training images/s of this zoo model with ASL vs 3x3 depthwise blocks (paper Table 2)."),
    batch: int = typer.Option(128, "--batch", min=1, help="Batch size for --train-speed."),
    modes: str = typer.Option("auto", "--modes", help="--train-speed step forms, comma-separated: eager, graph (whole step as a CUDA graph), compile, compile+graph; auto = eager on the CPU, eager,graph on CUDA."),
    amp: str = typer.Option("none", "--amp", help="--train-speed autocast: none or bf16 (CUDA)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="--train-speed in channels_last memory format."),
    shape: str = typer.Option("1x64x224x224", "--shape", help="NxCxHxW for --layer (C is also the conv output width)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16 for --layer."),
    backward: bool = typer.Option(False, "--backward", help="Time forward + backward for --layer."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads (the paper uses one)."),
    min_run_time: float = typer.Option(1.0, "--min-run-time", min=0.01, help="Seconds of timing per measurement."),
    out: Optional[Path] = typer.Option(None, "--out", help="CSV to append to (default results/profile_op_, profile_layers_, profile_models_ or train_speed_<device>.csv)."),
) -> None:
    """Measure speed against peers timed in the same run; print ratios and append a CSV.

    One of: --op asl (the operator vs copy, ReLU, 3x3 depthwise conv, grid_sample ASL), --layer (paper Table 1, Fig. 2), --model (paper Table 5, Fig. 4), --train-speed (paper Table 2).
    """
    if more:
        if not model:
            fail(f"unexpected arguments {' '.join(more)}; did you mean --model {' '.join(more)}?", code=2)
        model = list(model) + list(more)
    if op is None and layer is None and not model and train_speed is None:
        fail("say what to profile: --op asl, --layer NAME, --model NAME or --train-speed MODEL", code=2)
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}", code=2)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA device is visible")
    if device == "cpu":
        import torch

        torch.set_num_threads(threads)  # the whole process, so every library sees the same thread count
    if train_speed is not None:
        return _profile_train_speed(train_speed, batch, device, threads, min_run_time, out, modes, amp, channels_last)
    if layer is not None:
        return _profile_layers(layer, device, threads, shape, dtype, backward, min_run_time, out)
    if model:
        return _profile_models(model, device, threads, min_run_time, out)
    if op != "asl":
        fail(f"unknown --op {op!r}; the only operator is 'asl'", code=2)
    from rich.progress import Progress

    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.profile_op import default_cases, run

    cases = default_cases(device)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("timing", total=len(cases))
        try:
            rows = run(device, threads, cases, min_run_time,
                       progress=lambda i, label: bar.update(task, completed=i, description=f"timing {label}"))
        except RuntimeError as e:
            fail(str(e))
    _render_op_rows(rows, device)
    path = out or REPO / "results" / f"profile_op_{device}.csv"
    append_csv(rows, path)
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_layers(layer, device, threads, shape, dtype, backward, min_run_time, out) -> None:
    import torch

    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.profile_layers import LAYERS, figure, run

    names = list(LAYERS) if layer == "all" else [n.strip() for n in layer.split(",")]
    bad = [n for n in names if n not in LAYERS]
    if bad:
        fail(f"--layer must be one of {', '.join(LAYERS)} or all; got {', '.join(bad)}", code=2)
    try:
        dims = tuple(int(v) for v in shape.lower().split("x"))
        assert len(dims) == 4 and min(dims) > 0
    except (ValueError, AssertionError):
        fail(f"--shape must look like 1x64x224x224, got {shape!r}", code=2)
    dt = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}.get(dtype)
    if dt is None:
        fail(f"--dtype must be float32, float64 or bfloat16, got {dtype!r}", code=2)
    with console.status(f"timing {', '.join(names)} at {shape} on {device}"):
        try:
            rows = run(names, dims, device, threads, dt, backward, min_run_time)
        except (TypeError, RuntimeError) as e:
            fail(str(e))
    t = Table(title=f"layers at {shape} {dtype} ({'fwd+bwd' if backward else 'fwd'}), {rows[0]['device_name']}, {rows[0]['threads']} thread(s)")
    for c in ("layer", "ms", "MFLOPs", "ms/MFLOP", "paper ms", "paper MFLOPs"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for r in rows:
        t.add_row(r["description"], f"{r['ms']:.3f}", f"{r['mflops']:.1f}", f"{r['ms_per_mflop']:.4f}", _fmt(r["paper_ms"]), _fmt(r["paper_mflops"]))
    console.print(t)
    by = {r["layer"]: r for r in rows}
    if "pw" in by and "dw3" in by:
        console.print(f"1x1 conv has {by['pw']['mflops'] / by['dw3']['mflops']:.1f}x the FLOPs of the 3x3 depthwise conv and runs "
                      f"{by['dw3']['ms'] / by['pw']['ms']:.2f}x faster (paper: 7.1x the FLOPs, 3.5x faster)")
    path = out or REPO / "results" / f"profile_layers_{device}.csv"
    append_csv(rows, path)
    for f in figure(rows, path.with_name(path.stem + "_time_per_mflop")):
        console.print(f"wrote {f}")
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_models(specs, device, threads, min_run_time, out) -> None:
    from asl_cli import checkpoint as ckpt_io
    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.profile_models import figure, ratios, run

    with console.status(f"timing {', '.join(specs)}"):
        try:
            rows = run(list(specs), device, threads, min_run_time)
        except KeyError as e:
            fail(e.args[0], code=2)
        except ckpt_io.CheckpointError as e:
            fail(str(e))
    t = Table(title=f"models, batch 1, {rows[0]['device_name']}, {threads} CPU thread(s)")
    cols = ["model", "params (M)", "MACs (M)", "CPU ms", "paper CPU ms", "top-1", "paper top-1"]
    if device == "cuda":
        cols[4:4] = ["GPU ms", "GPU img/s (b256)"]
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
    for r in rows:
        vals = [r["model"], f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e6:.1f}", f"{r['cpu_ms_batch1']:.2f}", _fmt(r["paper_cpu_ms"]),
                _fmt(r["top1"]), _fmt(r["paper_top1"])]
        if device == "cuda":
            vals[4:4] = [f"{r['gpu_ms_batch1']:.3f}", f"{r['gpu_images_per_s_batch256']:.0f}"]
        t.add_row(*vals)
    console.print(t)
    for rr in ratios(rows):
        console.print(f"CPU latency {rr['pair']}: [bold]{rr['ratio']:.3f}x[/] (paper: {rr['paper_ratio']:.3f}x)")
    path = out or REPO / "results" / f"profile_models_{device}.csv"
    append_csv(rows, path)
    for f in figure(rows, path.with_name(path.stem + "_accuracy_vs_latency")):
        console.print(f"wrote {f}")
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_train_speed(model: str, batch: int, device: str, threads: int, min_run_time: float, out: Optional[Path],
                         modes: str = "auto", amp: str = "none", channels_last: bool = False) -> None:
    from asl_cli.experiments.bench import REPO, append_csv
    from asl_cli.experiments.train_speed import MODES, run
    from asl_cli.zoo import get_entry

    try:
        entry = get_entry(model)
    except KeyError as e:
        fail(e.args[0], code=2)
    if entry.family not in ("asnet", "as_resnet"):
        fail(f"--train-speed compares spatial blocks of asnet/as_resnet models; {model} is {entry.family}", code=2)
    if modes == "auto":
        chosen = ("eager", "graph") if device == "cuda" else ("eager",)
    else:
        chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in chosen if m not in MODES]
    if bad or not chosen:
        fail(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {modes!r}", code=2)
    if device == "cpu" and any("graph" in m for m in chosen):
        fail("--modes graph needs --device cuda (CUDA graphs)", code=2)
    if amp not in ("none", "bf16") or (amp == "bf16" and device != "cuda"):
        fail(f"--amp must be none, or bf16 with --device cuda; got {amp!r}", code=2)
    with console.status(f"timing training steps of {model} on {device}") as status:
        rows = run(model, batch=batch, device=device, threads=threads if device == "cpu" else None, amp=amp,
                   channels_last=channels_last, modes=chosen, min_run_time=max(min_run_time, 1.0),
                   progress=lambda text: status.update(f"timing training steps: {text}"))
    t = Table(title=f"training throughput, {model}, batch {batch}, amp {amp}, {'channels_last' if channels_last else 'NCHW'}, {rows[0]['device_name']}")
    for c in ("block", "mode", "ms/step", "images/s", "GPU busy", "ASL speed-up"):
        t.add_column(c, justify="left" if c in ("block", "mode") else "right")
    for r in rows:
        busy = "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        t.add_row(r["spatial"], r["mode"], f"{r['ms_per_step']:.2f}", f"{r['images_per_s']:.0f}", busy, f"{r['speedup_of_first']:.2f}x")
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


def _recipes_epilog() -> str:
    from asl_cli.config import list_recipes

    return "Recipes: " + ", ".join(list_recipes()) + ". Examples: asl train; asl train asnet20_16x1 data.dataset=cifar100; asl train --resume runs/RUN"


@app.command(epilog=_recipes_epilog())
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
    progress = Progress(TextColumn("[bold]train"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
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


@app.command()
def ablate(
    args: List[str] = typer.Argument(..., metavar="RECIPE [KEY=VALUE]...", help="The recipe to ablate and its overrides."),
    variant: str = typer.Option("all", "--variant", help="GS, SI, SR, TR, a comma list, or all (paper Table 4)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per variant (mean and std are reported)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of the variant runs (default runs/ablate-<recipe>)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Summary CSV (default results/ablate_<recipe>.csv)."),
) -> None:
    """Train the shift variants of one recipe and write a Table-4-style CSV; finished runs are reused."""
    from asl_cli import checkpoint as ckpt_io
    from asl_cli.config import ConfigError
    from asl_cli.data import DataError
    from asl_cli.engine import Interrupted, NonFiniteLoss, TrainingError
    from asl_cli.engine import train as run_training
    from asl_cli.experiments.ablate import VARIANTS, run
    from asl_cli.experiments.bench import REPO

    recipe, overrides = _split_recipe(args)
    if recipe is None:
        fail("name the recipe to ablate first, e.g. asl ablate quick --variant all", code=2)
    chosen = list(VARIANTS) if variant.lower() == "all" else [v.strip().upper() for v in variant.split(",")]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad:
        fail(f"--variant must be GS, SI, SR, TR or all; got {', '.join(bad)}", code=2)
    name = Path(recipe).stem
    root = root or Path("runs") / f"ablate-{name}"

    def train_one(cfg, resume):
        return _train_with_progress(run_training, cfg, resume, None, show=True)

    try:
        summary = run(recipe, chosen, seeds, overrides, root, train_one, on_status=lambda m: console.print(f"[bold]{m}[/]"))
    except Interrupted as e:
        fail(f"{e}. Run the same command again to continue.", code=130)
    except ConfigError as e:
        fail(str(e), code=2)
    except (NonFiniteLoss, TrainingError, DataError, ckpt_io.CheckpointError) as e:
        fail(str(e))
    t = Table(title=f"shift ablation: {name} ({seeds} seed(s))")
    for c in ("variant", "domain", "init", "learned", "top-1", "top-5", "params", "paper (w32 ImageNet)"):
        t.add_column(c)
    for _, r in summary.iterrows():
        t.add_row(r["variant"], r["shifting_domain"], r["initialisation"], "yes" if r["learned"] else "no",
                  f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}", f"{r['top5_mean']:.2f} ± {r['top5_std']:.2f}", str(r["params"]),
                  f"{r['paper_top1_as_resnet_w32_imagenet']}")
    console.print(t)
    path = csv or REPO / "results" / f"ablate_{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(path, index=False)
    console.print(f"wrote {path}")


@app.command(name="plot-shifts")
def plot_shifts(
    target: Path = typer.Argument(..., metavar="RUN_DIR|CHECKPOINT", help="A run folder (last checkpoint and shifts.csv) or a checkpoint."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default results/shifts/<name>)."),
) -> None:
    """Scatter every ASL layer's shifts (paper Fig. 3), their movement in training, and per-layer statistics."""
    from asl_cli import checkpoint as ckpt_io
    from asl_cli.experiments.bench import REPO
    from asl_cli.experiments.plot_shifts import run

    out = out or REPO / "results" / "shifts" / (target.stem if target.is_file() else target.name)
    try:
        res = run(target, out)
    except ckpt_io.CheckpointError as e:
        fail(str(e))
    st = res["stats"]
    t = Table(title=f"shift statistics ({len(st)} layers)")
    for c in ("layer", "channels", "mean |shift|", "max |shift|", "beyond 1 px"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for _, r in st.iterrows():
        t.add_row(r["layer"], str(r["channels"]), f"{r['mean_abs_shift']:.3f}", f"{r['max_abs_shift']:.3f}", f"{100 * r['share_beyond_1px']:.1f}%")
    console.print(t)
    for f in res["files"]:
        console.print(f"wrote {f}")


def main() -> None:
    app(prog_name="asl")


if __name__ == "__main__":
    main()
