"""The `asl` command line: parses arguments, calls the library, renders results with rich."""
from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.table import Table

class _Commands(TyperGroup):
    """Turns file-system errors (unwritable or invalid output paths, full disks) into one clear
    line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # output piped into a program that stopped reading (e.g. head)
            raise typer.Exit(0) from None
        except OSError as e:
            name = getattr(e, "filename", None)
            if isinstance(e, FileExistsError) and name and Path(name).is_file():
                text = f"Not a directory: {name} is a file where a folder is needed"
            else:
                text = f"{e.strerror or e}" + (f": {name}" if name else "")
            err.print(f"[bold red]error:[/] {text}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    name="asl",
    help="Active shift layer (Jeon & Kim, NeurIPS 2018): train, evaluate, ablate and profile the paper's networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def show(t: Table) -> None:
    """Prints a table that stays readable in an 80-column terminal: light borders, and every
    value keeps its full text (a narrow column wraps its header rather than cutting a number)."""
    from rich import box
    from rich.text import Text

    t.box, t.pad_edge, t.collapse_padding = box.SIMPLE_HEAD, False, True
    for col in t.columns:
        widths = [Text.from_markup(c).cell_len if isinstance(c, str) else 0 for c in col.cells]
        words = [len(w) for w in str(col.header).split()]
        width = max(widths + words, default=1)
        if width <= 24:  # values keep their width; longer text (a note, an error) takes what is left, wrapped
            col.width = width
        col.overflow = "fold"
    console.print(t)


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
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
    show(table)


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
        show(t)
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


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Layer(str, Enum):
    dw3 = "dw3"
    pw = "pw"
    bn = "bn"
    relu = "relu"
    add = "add"
    asl = "asl"
    all = "all"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"
    bfloat16 = "bfloat16"


class Split(str, Enum):
    test = "test"
    train = "train"


class EvalForm(str, Enum):
    eager = "eager"
    inference = "inference"


class StepMode(str, Enum):
    eager = "eager"
    graph = "graph"
    compile = "compile"
    compile_graph = "compile+graph"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"


profile_app = typer.Typer(
    help="Measure speed against peers timed in the same run; print ratios and append a CSV (default results/<kind>_<device>.csv "
         "under the working directory). `asl profile --layer dw3` times layers (paper Table 1), the same as "
         "`asl profile layers dw3`; the subcommands below time the operator, models and training steps.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")

DEVICE_OPT = typer.Option(Device.cpu, "--device", help="Where to time.")
THREADS_OPT = typer.Option(1, "--threads", min=1, help="CPU threads (the paper uses one).")
MIN_RUN_OPT = typer.Option(1.0, "--min-run-time", min=0.01, help="Seconds of timing per measurement.")
OUT_OPT = typer.Option(None, "--out", help="CSV to append to (figures are written beside it).")
SHAPE_OPT = typer.Option("1x64x224x224", "--shape", help="NxCxHxW (C is also the conv output width).")
DTYPE_OPT = typer.Option(DType.float32, "--dtype")
BACKWARD_OPT = typer.Option(False, "--backward", help="Time forward + backward.")


@profile_app.callback(invoke_without_command=True)
def profile_main(
    ctx: typer.Context,
    layer: Optional[List[Layer]] = typer.Option(None, "--layer", help="Time these layers (repeatable), as `asl profile layers` does."),
    shape: str = SHAPE_OPT, dtype: DType = DTYPE_OPT, backward: bool = BACKWARD_OPT,
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    if ctx.invoked_subcommand is not None:
        if layer:
            fail(f"--layer times layers by itself; give it without the {ctx.invoked_subcommand!r} subcommand", code=2)
        return
    if not layer:
        console.print(ctx.get_help())
        raise typer.Exit(0)
    profile_layers(layer, shape, dtype, backward, device, threads, min_run_time, out)


def _profile_device(device: Device, threads: int) -> str:
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA device is visible; use --device cpu", code=2)
    if device == Device.cpu:
        torch.set_num_threads(threads)  # the whole process, so every library sees the same thread count
    return device.value


@profile_app.command("op")
def profile_op(device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT,
               out: Optional[Path] = OUT_OPT) -> None:
    """The operator against copy, ReLU, 3x3 depthwise conv and a grid_sample ASL, forward and
    forward+backward; then the fused shift + 1x1 convolution against the 1x1 convolution alone at
    AS-ResNet's shapes."""
    from rich.progress import Progress

    from asl_cli.experiments.bench import append_csv, results_dir
    from asl_cli.experiments.profile_op import default_cases, run

    dev = _profile_device(device, threads)
    cases = default_cases(dev)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("timing", total=len(cases))
        try:
            rows = run(dev, threads, cases, min_run_time,
                       progress=lambda i, label: bar.update(task, completed=i, description=f"timing {label}"))
        except RuntimeError as e:
            fail(str(e))
    _render_op_rows(rows, dev)
    from asl_cli.experiments.profile_op import FUSED_TARGET, fused_rows

    with console.status("timing the fused shift + 1x1 convolution"):
        fused = fused_rows(dev, threads, min_run_time)
    t = Table(title="active shift + 1x1 convolution (AS-ResNet shapes, batch 1, float32)")
    for c in ("shape", "1x1 conv ms", "shift then conv ms", "fused ms", "fused / conv", "fused / shift then conv"):
        t.add_column(c, justify="left" if c == "shape" else "right")
    for r in fused:
        verdict = "[green]" if r["fused_vs_conv1x1"] <= FUSED_TARGET else "[red]"
        t.add_row(r["shape"], f"{r['conv1x1_ms']:.3f}", f"{r['shift_then_conv_ms']:.3f}", f"{r['ms']:.3f}",
                  f"{verdict}{r['fused_vs_conv1x1']:.2f}x[/]", f"{r['fused_vs_shift_then_conv']:.2f}x")
    show(t)
    console.print(f"target: fused within {FUSED_TARGET}x of the 1x1 convolution alone")
    rows = rows + fused
    path = out or results_dir() / f"profile_op_{dev}.csv"
    append_csv(rows, path)
    console.print(f"appended {len(rows)} rows to {path}")


@profile_app.command("layers")
def profile_layers(
    layers: Optional[List[Layer]] = typer.Argument(None, help="Layers to time (default all)."),
    shape: str = SHAPE_OPT, dtype: DType = DTYPE_OPT, backward: bool = BACKWARD_OPT,
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    """Per-layer time and FLOPs (paper Table 1, Fig. 2)."""
    dev = _profile_device(device, threads)
    names = [v.value for v in (layers or [Layer.all])]
    _profile_layers("all" if "all" in names else ",".join(names), dev, threads, shape, dtype.value, backward, min_run_time, out)


class Form(str, Enum):  # asl_cli.inference.FORMS (a test keeps them equal)
    eager = "eager"
    inference = "inference"
    frozen = "frozen"
    frozen_inference = "frozen-inference"
    compile = "compile"


@profile_app.command("models")
def profile_models(
    models: List[str] = typer.Argument(..., metavar="MODEL|CHECKPOINT...", help="Zoo models or checkpoints (see asl zoo)."),
    form: Optional[List[Form]] = typer.Option(None, "--form", help="Forms to time (repeatable; default eager, inference, frozen, "
                                              "frozen-inference). inference: BatchNorm folded, shift fused into the 1x1 conv; "
                                              "frozen: torch.jit trace + freeze + optimize_for_inference."),
    malloc_pad: int = typer.Option(64, "--malloc-pad", min=0, metavar="MIB",
                                   help="Have glibc's malloc keep this many MiB of freed memory instead of returning it "
                                        "to the system after every pass (mallopt, this process only, every model alike; "
                                        "0: glibc's default). Recorded in the CSV's malloc column."),
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    """Parameters, MACs and latency of models in each form, and the latency ratios of the paper's
    pairs with each model in its fastest form (Table 5, Fig. 4)."""
    from asl_cli.experiments.bench import pad_malloc

    dev = _profile_device(device, threads)
    forms = tuple(f.value for f in form) if form else ("eager", "inference", "frozen", "frozen-inference")
    _profile_models(models, dev, threads, min_run_time, out, forms, pad_malloc(malloc_pad))


@profile_app.command("train-speed")
def profile_train_speed(
    model: str = typer.Argument(..., help="An asnet or as_resnet zoo model; timed with ASL, 1B-DW3-B-1 and 1B-DW3-1 blocks."),
    batch: int = typer.Option(128, "--batch", min=1),
    mode: Optional[List[StepMode]] = typer.Option(None, "--mode", help="Step forms to time (repeatable; default eager on the CPU, eager and graph on CUDA)."),
    amp: Amp = typer.Option(Amp.none, "--amp", help="Autocast (bf16 needs CUDA)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory format."),
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    """Training images/s and GPU busy fraction with ASL vs 3x3 depthwise blocks (paper Table 2), using asl train's step."""
    dev = _profile_device(device, threads)
    modes = ",".join(m.value for m in mode) if mode else "auto"
    _profile_train_speed(model, batch, dev, threads, min_run_time, out, modes, amp.value, channels_last)


def _profile_layers(layer, device, threads, shape, dtype, backward, min_run_time, out) -> None:
    import torch

    from asl_cli.experiments.bench import append_csv, results_dir
    from asl_cli.experiments.profile_layers import LAYERS, figure, run

    names = list(LAYERS) if layer == "all" else [n.strip() for n in layer.split(",")]
    bad = [n for n in names if n not in LAYERS]
    if bad:
        fail(f"layers must be among {', '.join(LAYERS)} or all; got {', '.join(bad)}", code=2)
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
    show(t)
    by = {r["layer"]: r for r in rows}
    if "pw" in by and "dw3" in by:
        console.print(f"1x1 conv has {by['pw']['mflops'] / by['dw3']['mflops']:.1f}x the FLOPs of the 3x3 depthwise conv and runs "
                      f"{by['dw3']['ms'] / by['pw']['ms']:.2f}x faster (paper: 7.1x the FLOPs, 3.5x faster)")
    path = out or results_dir() / f"profile_layers_{device}.csv"
    append_csv(rows, path)
    for f in figure(rows, path.with_name(path.stem + "_time_per_mflop")):
        console.print(f"wrote {f}")
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_models(specs, device, threads, min_run_time, out, forms=("eager",), malloc="default") -> None:
    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.experiments.bench import append_csv, results_dir
    from asl_cli.experiments.profile_models import figure, ratios, run

    with console.status(f"timing {', '.join(specs)} as {', '.join(forms)}"):
        try:
            rows = [{**r, "malloc": malloc} for r in run(list(specs), device, threads, min_run_time, forms=forms)]
        except KeyError as e:
            fail(e.args[0], code=2)
        except ckpt_io.CheckpointError as e:
            fail(str(e))
    t = Table(title=f"models, batch 1, {rows[0]['device_name']}, {threads} CPU thread(s); "
                    f"matrix product {rows[0]['cpu_blas_gmacs_per_s']:.0f} GMAC/s; malloc: {malloc}")
    cols = ["model", "form", "params (M)", "MACs (M)", "CPU ms", "GMAC/s", "top-1"]
    if device == "cuda":
        cols[5:5] = ["GPU ms", "GPU img/s (b256 bf16)"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "form") else "right")
    for r in rows:
        vals = [r["model"], r["form"] + (" *" if r["fastest"] else ""), f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e6:.1f}",
                f"{r['cpu_ms_batch1']:.2f}", f"{r['cpu_gmacs_per_s']:.1f}", _fmt(r["top1"])]
        if device == "cuda":
            vals[5:5] = [_fmt(r.get("gpu_ms_batch1")), _fmt(r.get("gpu_images_per_s_batch256"))]
        t.add_row(*vals)
    show(t)
    console.print("* the model's fastest CPU form")
    paper = Table(title="the paper's figures (Caffe, one i7-5930K thread)")
    for c in ("model", "paper CPU ms", "paper top-1"):
        paper.add_column(c, justify="left" if c == "model" else "right")
    for r in {r["model"]: r for r in rows}.values():
        paper.add_row(r["model"], _fmt(r["paper_cpu_ms"]), _fmt(r["paper_top1"]))
    show(paper)
    for rr in ratios(rows):
        what = "GPU images/s" if rr["kind"].startswith("GPU") else "CPU latency"
        console.print(f"{what} {rr['pair']} ({rr['kind']}: {rr['forms']}): [bold]{rr['ratio']:.3f}x[/] "
                      f"(MACs {rr['macs_ratio']:.2f}x; paper, Caffe: {rr['paper_ratio']:.3f}x)")
    path = out or results_dir() / f"profile_models_{device}.csv"
    append_csv(rows, path)
    for f in figure(rows, path.with_name(path.stem + "_accuracy_vs_latency")):
        console.print(f"wrote {f}")
    console.print(f"appended {len(rows)} rows to {path}")


def _profile_train_speed(model: str, batch: int, device: str, threads: int, min_run_time: float, out: Optional[Path],
                         modes: str = "auto", amp: str = "none", channels_last: bool = False) -> None:
    from asl_cli.experiments.bench import append_csv, results_dir
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
    cpu = rows[0]["fraction_of_matmul_peak"] is not None
    for c in ("block", "mode", "ms/step", "images/s", "GMAC/s", "of matmul peak" if cpu else "GPU busy", "ASL speed-up"):
        t.add_column(c, justify="left" if c in ("block", "mode") else "right")
    for r in rows:
        share = f"{100 * r['fraction_of_matmul_peak']:.1f}%" if cpu else ("-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%")
        t.add_row(r["spatial"], r["mode"], f"{r['ms_per_step']:.2f}", f"{r['images_per_s']:.0f}", f"{r['gmacs_per_s']:.1f}", share,
                  f"{r['speedup_of_first']:.2f}x")
    show(t)
    path = out or results_dir() / f"train_speed_{device}.csv"
    append_csv(rows, path)
    if cpu:
        console.print(f"matrix-product peak in this run: {rows[0]['matmul_gmacs_per_s']:.1f} GMAC/s (float32 1024^3, "
                      f"{rows[0]['threads']} thread(s)); training MACs per image: "
                      + ", ".join(f"{r['spatial']} {r['train_macs_per_image'] / 1e6:.1f}M" for r in rows if r["mode"] == rows[0]["mode"]))
    asl = [r for r in rows if r["spatial"] == rows[0]["spatial"]]
    best = max(asl, key=lambda r: r["images_per_s"])
    for other in dict.fromkeys(r["spatial"] for r in rows if r["spatial"] != rows[0]["spatial"]):
        o = [r for r in rows if r["spatial"] == other]
        o_eager = next((r for r in o if r["mode"] == "eager"), None)
        o_best = max(o, key=lambda r: r["images_per_s"])
        line = f"{rows[0]['spatial']} fastest ({best['mode']}) / {other} fastest ({o_best['mode']}): {best['images_per_s'] / o_best['images_per_s']:.2f}x"
        if o_eager is not None:
            line += f"; / {other} eager: {best['images_per_s'] / o_eager['images_per_s']:.2f}x"
        console.print(line)
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
    show(t)
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

    return ("Recipes: " + ", ".join(list_recipes()) + ". Every configuration key, its default and the values it takes: "
            "asl config [RECIPE] [KEY=VALUE]... Examples: asl train; asl train asnet20_16x1 data.dataset=cifar100; "
            "asl train --resume runs/RUN")


@app.command(epilog=_recipes_epilog())
def config(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="A recipe name in recipes/ or a YAML path (default: quick), then dotted overrides."),
    plain: bool = typer.Option(False, "--plain", help="Only the YAML (as written into a run folder's config.yaml), no comments."),
) -> None:
    """Print a recipe resolved with its overrides, every key with its default and allowed values."""
    from asl_cli.config import DEFAULT_RECIPE, ConfigError, describe, dump, load_config

    recipe, overrides = _split_recipe(args)
    try:
        cfg = load_config(recipe or DEFAULT_RECIPE, overrides)
    except ConfigError as e:
        fail(str(e), code=2)
    if not plain:
        print(f"# {cfg['_source']}" + (f" with {' '.join(overrides)}" if overrides else ""))
    print(dump(cfg) if plain else describe(cfg), end="")


@app.command(epilog=_recipes_epilog())
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="A recipe name in recipes/ or a YAML path (default: quick), then dotted overrides such as optim.lr=0.05 data.root=/data."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this checkpoint or run folder (fine-tuning)."),
) -> None:
    """Train a zoo model from a YAML recipe; writes a run folder (config, metrics.csv, checkpoints, shifts)."""
    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.config import DEFAULT_RECIPE, ConfigError, load_config
    from asl_cli.data import DataError
    from asl_cli.errors import Interrupted, NonFiniteLoss, TrainingError
    from asl_cli.train import train as run_training

    recipe, overrides = _split_recipe(args)
    try:
        if resume is not None:
            if recipe or overrides:
                fail("--resume continues the run's own recipe (its config.yaml); give no recipe or overrides", code=2)
            if not (resume / "config.yaml").exists():
                fail(f"{resume} is not a run folder (no config.yaml)", code=2)
            cfg = load_config(str(resume / "config.yaml"))
        else:
            cfg = load_config(recipe or DEFAULT_RECIPE, overrides)
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
    except ConfigError as e:
        fail(str(e), code=2)
    except (TrainingError, DataError, ckpt_io.CheckpointError) as e:
        fail(str(e))
    if main_rank:
        _render_summary(summary)


def _train_with_progress(run_training, cfg, resume, init_from, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from asl_cli.train import Callbacks

    if not show:
        return run_training(cfg, resume=resume, init_from=init_from)
    progress = Progress(TextColumn("[bold]train"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = {}

    def on_start(info):
        console.print(f"run folder: [bold]{info['run_dir']}[/]  model {info['model']} on {info['device']}"
                      f" x{info['world']}  ({info['steps_per_epoch']} steps/epoch)")
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
) -> None:
    """Top-1/top-5, loss, parameters, MACs and latency of a checkpoint; appends one CSV row.
    A checkpoint whose outputs are not finite (a diverged run) is an error (exit status 1) and
    appends no row."""
    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.config import ConfigError
    from asl_cli.data import DataError
    from asl_cli.experiments.bench import append_csv
    from asl_cli.experiments.evaluate import run

    try:
        row = run(target, split.value, device, not no_latency, tuple(overrides or ()), form.value)
    except ConfigError as e:
        fail(str(e), code=2)
    except (ckpt_io.CheckpointError, DataError) as e:
        fail(str(e))
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


@app.command(name="import-caffe")
def import_caffe(
    model_file: Path = typer.Argument(..., metavar="MODEL.caffemodel", help="The authors' trained AS-ResNet in Caffe's binary format."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Zoo architecture (default: from the file's base width, e.g. as_resnet_w32)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (default: checkpoints/<arch>-caffe.pt)."),
) -> None:
    """Convert a Caffe AS-ResNet model into a checkpoint for eval, predict, profile, plot-shifts and fine-tuning."""
    from asl_cli.experiments.caffe import CaffeFormatError
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
    show(t)


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint file or run folder."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files (any format Pillow reads)."),
    topk: int = typer.Option(5, "--topk", min=1, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Classify images with a checkpoint, using the preprocessing recorded in it."""
    import json

    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.experiments.predict import predict as run_predict
    from asl_cli.data.preprocess import ImageError

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
        show(t)


def _live_view(runs) -> Table:
    t = Table(title="runs", show_lines=False)
    notes = any(r.message for r in runs)
    for c in ("run", "state", "step", "train top-1", "test top-1", "img/s", "elapsed") + (("note",) if notes else ()):
        t.add_column(c)
    for r in runs:
        p = r.progress
        step = f"{p.get('step', 0)}/{p['total']}" if p.get("total") else ""
        t.add_row(f"{r.cell} seed {r.seed}", r.state, step, str(p.get("train_top1", "")), str(p.get("test_top1", "")),
                  str(p.get("images_per_s", "")), f"{p['elapsed_s']:.0f} s" if "elapsed_s" in p else "",
                  *((r.message,) if notes else ()))
    return t


class Executor(str, Enum):
    pool = "pool"
    cluster = "cluster"
    slurm = "slurm"
    local = "local"
    debug = "debug"


EXECUTOR_OPT = typer.Option(Executor.pool, "--executor", help="pool: worker processes on this machine (--jobs at once). "
                            "slurm: one submitit job per run; local: the same jobs as processes of this machine; debug: in this "
                            "process; cluster: slurm where Slurm is installed, else local. Needs pip install 'asl-cli[cluster]'.")
WAIT_OPT = typer.Option(None, "--wait/--no-wait", help="With a job executor, wait for the jobs with a live table (default: "
                        "return once submitted; run the same command again to collect the summary).")
STATUS_OPT = typer.Option(False, "--status", help="Show each run's state (done, running, pending, failed, queued) and submit nothing.")
PARTITION_OPT = typer.Option(None, "--partition", help="Slurm partition (default: the recipe's cluster.partition).")
TIME_OPT = typer.Option(None, "--time", min=1, metavar="MINUTES", help="Each job's time limit; a job that reaches it saves a "
                        "checkpoint and requeues itself (default: cluster.timeout_min).")
GPUS_OPT = typer.Option(None, "--gpus-per-node", min=0, help="GPUs per job, one process each with DistributedDataParallel.")
CPUS_OPT = typer.Option(None, "--cpus-per-task", min=1, help="CPUs per process of a job.")
NODES_OPT = typer.Option(None, "--nodes", min=1, help="Nodes per job.")


def _grid(executor, wait, status, partition, time_min, gpus, cpus, nodes) -> dict:
    return {"executor": executor.value, "wait": wait, "status": status,
            "resources": dict(partition=partition, timeout_min=time_min, gpus_per_node=gpus, cpus_per_task=cpus, nodes=nodes)}


def _log_changes():
    """For a log file: one line whenever a run changes state."""
    seen: dict = {}

    def log(rs):
        for r in rs:
            if seen.get(id(r)) != r.state:
                seen[id(r)] = r.state
                top1 = r.progress.get("test_top1")
                console.print(f"{r.cell} seed {r.seed}: {r.state}" + (f" (test top-1 {top1})" if r.state == "done" and top1 is not None else "")
                              + (f": {r.message}" if r.state == "failed" else ""), highlight=False)
    return log


def _watch(work, runs):
    """Runs work(on_tick) with a live table in a terminal, log lines otherwise."""
    from rich.live import Live

    if console.is_terminal:
        with Live(_live_view(runs), console=console, refresh_per_second=2) as live:
            return work(lambda rs: live.update(_live_view(rs)))
    return work(_log_changes())


def _run_sweep(recipe: str, runs, jobs: int, grid: dict, root: Path):
    """Trains the sweep's missing runs: in this process for one job, in worker processes for more,
    or as submitit jobs. Returns the failed runs, or None when runs are still to finish (the
    summary then waits for a later call)."""
    from asl_cli.train import train as run_training
    from asl_cli.experiments import cluster
    from asl_cli.experiments.sweep import execute

    status = lambda m: console.print(f"[bold]{m}[/]", highlight=False)  # noqa: E731
    if grid["status"]:
        cluster.refresh(runs)
        show(_live_view(runs))
        return None
    if grid["executor"] != "pool":
        cluster.refresh(runs)
        res = cluster.Resources.from_config(runs[0].cfg, **grid["resources"])
        jobs_by_run = cluster.submit(recipe, runs, grid["executor"], res, root / ".jobs", status)
        waiting = grid["wait"] if grid["wait"] is not None else grid["executor"] == "debug"
        if waiting:
            _watch(lambda tick: cluster.wait(runs, jobs_by_run, tick), runs)
        else:
            show(_live_view(runs))
        live = [r for r in runs if r.state in ("running", "pending")]
        if live:
            console.print(f"{len(live)} run(s) still queued or running; run the same command again (or with --status) to see "
                          "them, and to write the summary once every run is done")
            return None
        failed = [r for r in runs if r.state == "failed"]
    elif jobs == 1:
        failed = execute(recipe, runs, 1, lambda cfg, resume: _train_with_progress(run_training, cfg, resume, None, show=True),
                         on_status=status)
    else:
        failed = _watch(lambda tick: execute(recipe, runs, jobs, None, on_status=status, on_tick=tick), runs)
    for r in failed:
        log = r.run_dir / "sweep.log" if grid["executor"] == "pool" else root / ".jobs"
        err.print(f"[bold red]{r.cell} seed {r.seed} failed[/] (log: {log}): {r.message}", highlight=False)
    return failed


def _guarded(work):
    """Runs a sweep's planning and training; its errors end the command with one message."""
    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.config import ConfigError
    from asl_cli.data import DataError
    from asl_cli.errors import Interrupted, TrainingError

    try:
        return work()
    except Interrupted as e:
        fail(f"{e}. Run the same command again to continue.", code=130)
    except ConfigError as e:
        fail(str(e), code=2)
    except (TrainingError, DataError, ckpt_io.CheckpointError) as e:
        fail(str(e))


def _write_summary(summary, csv: Path, title: str, paper_label: str) -> None:
    from asl_cli.experiments.sweep import plot_summary

    csv.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(csv, index=False)
    paths = plot_summary(summary.rename(columns={"variant": "cell"}) if "cell" not in summary else summary,
                         csv.with_suffix(""), title, paper_label) if summary["top1_mean"].notna().any() else []
    console.print(f"wrote {csv}" + "".join(f", {p}" for p in paths))


def _summary_table(summary, title: str, first_col: str) -> Table:
    t = Table(title=title)
    for c in (first_col, "seeds", "top-1 mean ± std", "95% CI", "top-5", "vs baseline (p)", "params", "paper"):
        t.add_column(c)
    for _, r in summary.iterrows():
        if r["seeds"] == 0:
            t.add_row(str(r[first_col]), "0", "", "", "", "", "", "")
            continue
        vs = f"{r['diff_vs_baseline']:+.2f} (p={r['p_welch']:.3g})" if "diff_vs_baseline" in r and r["diff_vs_baseline"] == r["diff_vs_baseline"] else ""
        paper = r.get("paper_top1")
        t.add_row(str(r[first_col]), str(r["seeds"]), f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
                  f"[{r['top1_ci95_low']:.2f}, {r['top1_ci95_high']:.2f}]", f"{r['top5_mean']:.2f}", vs, str(r["params"]),
                  "" if paper is None or paper != paper else f"{paper}")
    return t


def _finish_sweep(summary, failed, csv: Path, title: str, paper_label: str, first_col: str) -> None:
    from asl_cli.experiments.bench import provenance
    from asl_cli.train.builders import Dist, pick_device

    for k, val in provenance(str(pick_device("auto", Dist())), None).items():
        summary[k] = val
    if failed:  # each cell's failed runs and why, beside its statistics over the finished ones
        cells = summary["variant" if "variant" in summary else "cell"]
        errors = {c: "; ".join(f"seed {r.seed}: {r.message}" for r in failed if r.cell == c) for c in cells}
        summary["failed_runs"] = [errors[c] for c in cells]
    show(_summary_table(summary, title, first_col))
    _write_summary(summary, csv, title, paper_label)
    if failed:
        fail(f"{len(failed)} run(s) failed (see above); the summary holds the finished ones. Run the same command again to retry them.")


@app.command()
def sweep(
    args: List[str] = typer.Argument(..., metavar="RECIPE [KEY=VALUE]...", help="The recipe and overrides shared by every run."),
    axis: List[str] = typer.Option([], "--axis", "-a", metavar="KEY=V1,V2,...",
                                   help="An override axis; several --axis give their product. E.g. --axis model.args.spatial=asl,dw3_bn,dw3"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per cell (train.seed=0..N-1); statistics over seeds."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs at once, each in its own process (spread over visible GPUs; CPU cores divided)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Cell that the others are compared with (Welch t-test); default: the first."),
    seed_key: List[str] = typer.Option(["train.seed"], "--seed-key", help="Config keys set to the seed number (repeatable)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of the runs (default runs/sweep-<recipe>)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Summary CSV; the figure is written beside it (default results/sweep_<recipe>.csv)."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    executor: Executor = EXECUTOR_OPT, wait: Optional[bool] = WAIT_OPT, status: bool = STATUS_OPT,
    partition: Optional[str] = PARTITION_OPT, time_min: Optional[int] = TIME_OPT, gpus_per_node: Optional[int] = GPUS_OPT,
    cpus_per_task: Optional[int] = CPUS_OPT, nodes: Optional[int] = NODES_OPT,
) -> None:
    """Train a recipe over override axes x seeds and summarise each cell (mean, std, 95% CI,
    Welch t-test against a baseline cell), with a figure. Finished runs are reused, interrupted
    ones resumed: run the same command again to continue.

    Example: asl sweep asnet20_16x1 data.dataset=folder data.path=cifar10 --axis model.args.spatial=asl,dw3_bn,dw3 --seeds 2 --jobs 2
    """
    from asl_cli.config import ConfigError
    from asl_cli.experiments.sweep import Axis, per_run, plan, summary_table
    from asl_cli.zoo.paper import TABLE2

    recipe, overrides = _split_recipe(args)
    if recipe is None:
        fail("name the recipe first, e.g. asl sweep quick --axis optim.lr=0.05,0.1", code=2)
    name = Path(recipe).stem
    root = root or Path("runs") / f"sweep-{name}"
    axes = _guarded(lambda: [Axis.parse(a) for a in axis])

    def work():
        runs = plan(recipe, overrides, axes, seeds, root, tuple(seed_key))
        cells = list(dict.fromkeys(r.cell for r in runs))
        base = baseline if baseline is not None else cells[0]
        if base not in cells:
            raise ConfigError(f"--baseline {base!r} is not a cell of this sweep ({', '.join(cells)})")
        failed = _run_sweep(recipe, runs, jobs, grid, root)
        if failed is None:
            return None, runs
        return summary_table(runs, per_run(runs), base, recipe, overrides, paper, label), failed

    grid = _grid(executor, wait, status, partition, time_min, gpus_per_node, cpus_per_task, nodes)
    paper = {k: v["c10"] for k, v in TABLE2.items()} if [a.key for a in axes] == ["model.args.spatial"] else None
    label = "paper Table 2 (ASNet-20 b88, CIFAR-10, full schedule)" if paper else ""
    summary, failed = _guarded(work)
    if summary is not None:
        _finish_sweep(summary, failed, csv or Path("results") / f"sweep_{name}.csv",
                      title or f"{name}: " + " x ".join(a.key for a in axes) + f" ({seeds} seed(s))", label, "cell")


@app.command()
def ablate(
    args: Optional[List[str]] = typer.Argument(None, metavar="[RECIPE] [KEY=VALUE]...",
                                               help="The recipe to ablate (default: quick) and its overrides."),
    variant: str = typer.Option("all", "--variant", help="GS, SI, SR, TR, a comma list, or all (paper Table 4); TN (not in "
                                "the paper): learned like TR from SR's N(0,1) start."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per variant (mean, std, 95% CI are reported)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs at once, each in its own process."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Variant the others are compared with (Welch t-test); "
                                           "default TR when it is trained, else the last variant."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of the variant runs (default runs/ablate-<recipe>)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Summary CSV; the figure is written beside it (default results/ablate_<recipe>.csv)."),
    executor: Executor = EXECUTOR_OPT, wait: Optional[bool] = WAIT_OPT, status: bool = STATUS_OPT,
    partition: Optional[str] = PARTITION_OPT, time_min: Optional[int] = TIME_OPT, gpus_per_node: Optional[int] = GPUS_OPT,
    cpus_per_task: Optional[int] = CPUS_OPT, nodes: Optional[int] = NODES_OPT,
) -> None:
    """Train the shift variants of one recipe and write a Table-4-style CSV and figure; finished
    runs are reused (the shift-variant preset of `asl sweep`).

    Examples: asl ablate --variant SR; asl ablate cifar10_cpu data.path=DIR --seeds 3 --jobs 2
    """
    from asl_cli.experiments.ablate import PAPER_LABEL, parse_variants, pick_baseline, plan_variants, variant_columns
    from asl_cli.experiments.sweep import per_run, summary_table
    from asl_cli.zoo.paper import TABLE4

    from asl_cli.config import DEFAULT_RECIPE

    recipe, overrides = _split_recipe(args)
    recipe = recipe or DEFAULT_RECIPE
    name = Path(recipe).stem
    root = root or Path("runs") / f"ablate-{name}"

    def work():
        chosen = parse_variants(variant)
        base = pick_baseline(baseline, chosen)
        runs = plan_variants(recipe, chosen, seeds, overrides, root)
        failed = _run_sweep(recipe, runs, jobs, grid, root)
        if failed is None:
            return None, runs
        return variant_columns(summary_table(runs, per_run(runs), base, recipe, overrides, TABLE4, PAPER_LABEL)), failed

    grid = _grid(executor, wait, status, partition, time_min, gpus_per_node, cpus_per_task, nodes)
    summary, failed = _guarded(work)
    if summary is not None:
        _finish_sweep(summary, failed, csv or Path("results") / f"ablate_{name}.csv",
                      f"shift ablation: {name} ({seeds} seed(s))", PAPER_LABEL, "variant")


@app.command(name="plot-shifts")
def plot_shifts(
    targets: Optional[List[Path]] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT]...",
                                                   help="A run folder (last checkpoint and shifts.csv) or a checkpoint "
                                                        "(default: the newest run under ./runs with a checkpoint); several "
                                                        "run folders: compare how far their shifts travelled."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default results/shifts/<name>, or "
                                       "results/shift_travel for several runs)."),
) -> None:
    """Scatter every ASL layer's shifts (paper Fig. 3), their movement in training and how far they
    travelled (shift_travel.csv: per layer and step, the mean distance from the start, the spread
    and the share beyond 1 px), and per-layer statistics. Given several run folders, one table and
    figure of their travel against steps, against the shift budget (the sum of per-step shift
    learning rates) and against the random-walk length (the square root of their squares' sum)."""
    from asl_cli.train import checkpoint as ckpt_io
    from asl_cli.experiments.bench import results_dir
    from asl_cli.experiments.plot_shifts import compare, newest_run, run

    if targets and len(targets) > 1:
        try:
            res = compare(list(targets), out or results_dir() / "shift_travel")
        except ckpt_io.CheckpointError as e:
            fail(str(e))
        last = res["table"].groupby("run", sort=False).tail(1)
        t = Table(title="shift travel at each run's end")
        for c in ("run", "steps", "shift x lr", "budget px", "walk px", "travel px", "spread", "beyond 1 px", "test top-1"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for _, r in last.iterrows():
            t.add_row(r["run"], str(r["step"]), f"{r['shift_lr_mult']:g}", f"{r['shift_budget_px']:.2f}", f"{r['shift_walk_px']:.3f}",
                      f"{r['mean_travel']:.3f}",
                      f"{r['spread']:.3f}", f"{100 * r['share_beyond_1px']:.1f}%", _fmt(r["final_test_top1"]))
        show(t)
        for f in res["files"]:
            console.print(f"wrote {f}")
        return
    target = targets[0] if targets else None
    try:
        if target is None:
            target = newest_run(Path("runs"))
            console.print(f"plotting the newest run: [bold]{target}[/]")
        out = out or results_dir() / "shifts" / (target.stem if target.is_file() else target.name)
        res = run(target, out)
    except ckpt_io.CheckpointError as e:
        fail(str(e))
    for note in res["notes"]:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    st = res["stats"]
    t = Table(title=f"shift statistics ({len(st)} layers)")
    for c in ("layer", "channels", "mean |shift|", "max |shift|", "beyond 1 px"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for _, r in st.iterrows():
        t.add_row(r["layer"], str(r["channels"]), f"{r['mean_abs_shift']:.3f}", f"{r['max_abs_shift']:.3f}", f"{100 * r['share_beyond_1px']:.1f}%")
    show(t)
    for f in res["files"]:
        console.print(f"wrote {f}")


def main() -> None:
    app(prog_name="asl")


if __name__ == "__main__":
    main()
