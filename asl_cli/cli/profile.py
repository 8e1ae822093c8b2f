"""`asl profile`: the operator, layers, models and training steps timed against peers measured in
the same run."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..zoo.paper import table1_ratios, table2_train_speedup
from ..allocator import DEFAULT_PAD_MIB, MAX_PAD_MIB
from .app import Runtime, app, console, err, fail, fmt, show


def _op_summary(by_case: dict[str, list[dict]], targets: dict) -> Table:
    """One line per case: the ratios the CPU targets are stated in."""
    r0 = next(iter(by_case.values()))[0]
    t = Table(title=f"active shift against a copy of its input ({r0['device_name']}, {r0['threads']} thread(s))")
    for c in ("case", "copy ms", "fwd ms", "fwd / copy", "fwd+bwd ms", "fwd+bwd / copy", "fwd+bwd / dw3"):
        t.add_column(c, justify="left" if c == "case" else "right")

    def mark(value: float, key: str) -> str:
        target = targets.get(key)
        return f"{value:.2f}x" if target is None else ("[green]" if value <= target else "[red]") + f"{value:.2f}x[/]"

    for case, rs in by_case.items():
        ms = {(r["op"], r["pass"]): r["ms"] for r in rs}
        r = rs[0]
        t.add_row(case, f"{ms[('copy', 'fwd')]:.4g}", f"{ms[('asl', 'fwd')]:.4g}", mark(r["fwd_vs_copy"], "fwd_vs_copy"),
                  f"{ms[('asl', 'fwd+bwd')]:.4g}", mark(r["fwdbwd_vs_copy"], "fwdbwd_vs_copy"), f"{r['fwdbwd_vs_dw3']:.2f}x")
    return t


def _render_op_rows(rows: list[dict], device: str) -> None:
    from asl_cli.experiments.benchmarks.profile_op import CPU_TARGETS, CUDA_TARGETS

    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    if device == "cpu" and len(by_case) > 1:  # many cases: their ratios in one table
        show(_op_summary(by_case, CPU_TARGETS))
        console.print(f"targets: forward <= {CPU_TARGETS['fwd_vs_copy']}x a copy, forward + backward <= "
                      f"{CPU_TARGETS['fwdbwd_vs_copy']}x (copy: y.copy_(x) into an existing tensor; every row is in the CSV)")
        return
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


class StepMode(str, Enum):
    eager = "eager"
    graph = "graph"
    compile = "compile"
    compile_graph = "compile+graph"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"


class Layout(str, Enum):
    nchw = "nchw"
    channels_last = "channels_last"


class BnRelu(str, Enum):
    aten = "aten"
    fused = "fused"


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
MALLOC_PAD_OPT = typer.Option(DEFAULT_PAD_MIB, "--malloc-pad", min=0, max=MAX_PAD_MIB, metavar="MIB",
                              help="Have glibc's malloc keep up to this many MiB of freed memory instead of returning it "
                                   "to the system after every pass (mallopt, this process only, every model alike; as "
                                   "asl train does on the CPU; 0: glibc's default). Recorded in the CSV's malloc column.")
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


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        fail(f"--shape must look like 1x64x224x224 (four positive sizes), got {text!r}", code=2)
    return dims


@profile_app.command("op")
def profile_op(device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT,
               out: Optional[Path] = OUT_OPT,
               shapes: Optional[List[str]] = typer.Option(None, "--shape", metavar="NxCxHxW",
                                                          help="Time these shapes only (repeatable; CPU: each in both "
                                                               "memory formats at strides 1 and 2). Default: the CPU's "
                                                               "five shapes, or the GPU's cases."),
               malloc_pad: int = MALLOC_PAD_OPT) -> None:
    """The operator against a copy, ReLU, 3x3 depthwise conv and a grid_sample ASL, forward and
    forward+backward, in ratios to the copy measured in the same run; then the fused shift + 1x1
    convolution against the 1x1 convolution alone at AS-ResNet's shapes."""
    import torch
    from rich.progress import Progress

    from asl_cli.experiments.bench import append_csv, results_dir
    from asl_cli.experiments.benchmarks.profile_op import Case, default_cases, run

    from asl_cli.allocator import pad_malloc

    dev = _profile_device(device, threads)
    malloc = pad_malloc(malloc_pad) if dev == "cpu" else "default"
    cases = default_cases(dev)
    if shapes:
        dims = [_parse_shape(s) for s in shapes]
        cases = [Case(d, torch.float32, cl, stride) for d in dims for cl in (False, True) for stride in (1, 2)]
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("timing", total=len(cases))
        try:
            rows = run(dev, threads, cases, min_run_time,
                       progress=lambda i, label: bar.update(task, completed=i, description=f"timing {label}"))
        except RuntimeError as e:
            fail(str(e))
    _render_op_rows(rows, dev)
    from asl_cli.experiments.benchmarks.profile_op import FUSED_TARGET, fused_rows

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
    for r in rows:
        r["malloc"] = malloc
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
    malloc_pad: int = MALLOC_PAD_OPT,
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help="torch: the forms above in PyTorch; onnxruntime: each model "
                                    "exported to standard ONNX (both shift forms for shift networks) and timed in ONNX "
                                    "Runtime's CPU provider; an exported .onnx file is taken as it is."),
    batch: int = typer.Option(8, "--batch", min=1, help="With --runtime onnxruntime: the batch timed beside batch 1."),
    shift_form: Optional[List[str]] = typer.Option(None, "--shift-form", help="With --runtime onnxruntime: the shift's ONNX "
                                                   "forms to time (repeatable; default conv and slice, see asl export)."),
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    """Parameters, MACs and latency of models in each form, and the latency ratios of the paper's
    pairs with each model in its fastest form (Table 5, Fig. 4).

    Examples: asl profile models as_resnet_w32 mobilenet_v2_x0.5; asl profile models as_resnet_w32
    mobilenet_v2_x0.5 --runtime onnxruntime --threads 2
    """
    from asl_cli.allocator import pad_malloc

    if runtime == Runtime.onnxruntime:
        if device != Device.cpu:
            fail("--runtime onnxruntime times ONNX Runtime's CPU provider; leave --device as cpu", code=2)
        if form:
            fail("--form picks PyTorch forms; with --runtime onnxruntime both shift forms are timed", code=2)
        from asl_cli.export import SHIFT_FORMS

        bad = [f for f in shift_form or [] if f not in SHIFT_FORMS]
        if bad:
            fail(f"--shift-form must be one of {', '.join(SHIFT_FORMS)}, got {bad[0]!r}", code=2)
        _profile_models_onnx(models, threads, batch, min_run_time, out, tuple(shift_form or SHIFT_FORMS))
        return
    dev = _profile_device(device, threads)
    forms = tuple(f.value for f in form) if form else ("eager", "inference", "frozen", "frozen-inference")
    _profile_models(models, dev, threads, min_run_time, out, forms, pad_malloc(malloc_pad))


@profile_app.command("train-speed")
def profile_train_speed(
    model: str = typer.Argument(..., help="An asnet or as_resnet zoo model; timed with ASL, 1B-DW3-B-1 and 1B-DW3-1 blocks."),
    batch: int = typer.Option(128, "--batch", min=1),
    mode: Optional[List[StepMode]] = typer.Option(None, "--mode", help="Step forms to time (repeatable; default eager on the CPU, eager and graph on CUDA)."),
    amp: Amp = typer.Option(Amp.none, "--amp", help="Autocast (bf16 needs CUDA)."),
    layout: Optional[List[Layout]] = typer.Option(None, "--layout", help="Memory formats to time (repeatable; default both "
                                                  "on the CPU, where asl train uses channels_last; nchw on CUDA)."),
    bn_relu: Optional[List[BnRelu]] = typer.Option(None, "--bn-relu", help="BatchNorm-ReLU pairs as ATen's two operators "
                                                   "or as asl's fused one, with the residual additions in their "
                                                   "convolution's call and, in channels_last, each identity block's "
                                                   "pre-activation in its first 1x1 convolution (repeatable; default both "
                                                   "on the CPU, where "
                                                   "asl train fuses them; aten on CUDA)."),
    malloc_pad: int = MALLOC_PAD_OPT,
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds of timing that visit every configuration in turn; each "
                               "figure is the median over them, so a drifting machine speed moves all alike."),
    device: Device = DEVICE_OPT, threads: int = THREADS_OPT, min_run_time: float = MIN_RUN_OPT, out: Optional[Path] = OUT_OPT,
) -> None:
    """Training images/s and GPU busy fraction with ASL vs 3x3 depthwise blocks (paper Table 2), using asl train's step
    (on the CPU with the allocator setting that asl train's train.malloc_pad_mib=auto picks)."""
    from asl_cli.allocator import pad_malloc

    dev = _profile_device(device, threads)
    modes = ",".join(m.value for m in mode) if mode else "auto"
    layouts = tuple(v.value for v in layout) if layout else (("nchw", "channels_last") if dev == "cpu" else ("nchw",))
    bn_relus = tuple(v.value for v in bn_relu) if bn_relu else (("aten", "fused") if dev == "cpu" else ("aten",))
    _profile_train_speed(model, batch, dev, threads, min_run_time, out, modes, amp.value, layouts, pad_malloc(malloc_pad),
                         rounds, bn_relus)


def _profile_layers(layer, device, threads, shape, dtype, backward, min_run_time, out) -> None:
    import torch

    from asl_cli.experiments.bench import results_dir
    from asl_cli.experiments.benchmarks.profile_layers import LAYERS, figure, run

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
        t.add_row(r["description"], f"{r['ms']:.3f}", f"{r['mflops']:.1f}", f"{r['ms_per_mflop']:.4f}", fmt(r["paper_ms"]), fmt(r["paper_mflops"]))
    show(t)
    by = {r["layer"]: r for r in rows}
    if "pw" in by and "dw3" in by:
        flops_ratio, speed_ratio = table1_ratios()
        console.print(f"1x1 conv has {by['pw']['mflops'] / by['dw3']['mflops']:.1f}x the FLOPs of the 3x3 depthwise conv and runs "
                      f"{by['dw3']['ms'] / by['pw']['ms']:.2f}x faster (paper: {flops_ratio:.1f}x the FLOPs, {speed_ratio:.1f}x faster)")
    _append_with_figure(rows, out or results_dir() / f"profile_layers_{device}.csv", figure, "_time_per_mflop")


def _profile_models(specs, device, threads, min_run_time, out, forms=("eager",), malloc="default") -> None:
    from asl_cli.experiments.bench import results_dir
    from asl_cli.experiments.benchmarks.profile_models import figure, ratios, run

    with console.status(f"timing {', '.join(specs)} as {', '.join(forms)}"):
        rows = [{**r, "malloc": malloc} for r in run(list(specs), device, threads, min_run_time, forms=forms)]
    t = Table(title=f"models, batch 1, {rows[0]['device_name']}, {threads} CPU thread(s); "
                    f"matrix product {rows[0]['cpu_blas_gmacs_per_s']:.0f} GMAC/s; malloc: {malloc}")
    cols = ["model", "form", "params (M)", "MACs (M)", "CPU ms", "GMAC/s", "top-1"]
    if device == "cuda":
        cols[5:5] = ["GPU ms", "GPU img/s (b256 bf16)"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "form") else "right")
    for r in rows:
        vals = [r["model"], r["form"] + (" *" if r["fastest"] else ""), f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e6:.1f}",
                f"{r['cpu_ms_batch1']:.2f}", f"{r['cpu_gmacs_per_s']:.1f}", fmt(r["top1"])]
        if device == "cuda":
            vals[5:5] = [fmt(r.get("gpu_ms_batch1")), fmt(r.get("gpu_images_per_s_batch256"))]
        t.add_row(*vals)
    show(t)
    console.print("* the model's fastest CPU form")
    paper = Table(title="the paper's figures (Caffe, one i7-5930K thread)")
    for c in ("model", "paper CPU ms", "paper top-1"):
        paper.add_column(c, justify="left" if c == "model" else "right")
    for r in {r["model"]: r for r in rows}.values():
        paper.add_row(r["model"], fmt(r["paper_cpu_ms"]), fmt(r["paper_top1"]))
    show(paper)
    for rr in ratios(rows):
        what = "GPU images/s" if rr["kind"].startswith("GPU") else "CPU latency"
        console.print(f"{what} {rr['pair']} ({rr['kind']}: {rr['forms']}): [bold]{rr['ratio']:.3f}x[/] "
                      f"(MACs {rr['macs_ratio']:.2f}x; paper, Caffe: {rr['paper_ratio']:.3f}x)")
    _append_with_figure(rows, out or results_dir() / f"profile_models_{device}.csv", figure, "_accuracy_vs_latency")


def _profile_train_speed(model: str, batch: int, device: str, threads: int, min_run_time: float, out: Optional[Path],
                         modes: str = "auto", amp: str = "none", layouts=("nchw",), malloc: str = "default",
                         rounds: int = 5, bn_relus=("aten",)) -> None:
    from asl_cli.experiments.bench import append_csv, results_dir
    from asl_cli.experiments.benchmarks.train_speed import MODES, layout_of, run, speedups
    from asl_cli.zoo import get_entry

    entry = get_entry(model)
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
                   layouts=layouts, modes=chosen, bn_relus=bn_relus, min_run_time=min_run_time, rounds=rounds,
                   progress=lambda text: status.update(f"timing training steps: {text}"))
    rows = [{**r, "malloc": malloc} for r in rows]
    t = Table(title=f"training throughput, {model}, batch {batch}, amp {amp}, "
                    f"{rows[0]['device_name']}, malloc {malloc}")
    cpu = rows[0]["fraction_of_matmul_peak"] is not None
    for c in ("block", "mode", "layout", "BN-ReLU", "ms/step", "images/s", "GMAC/s",
              *(("of matmul peak", "page faults/step") if cpu else ("GPU busy",)), "ASL speed-up"):
        t.add_column(c, justify="left" if c in ("block", "mode", "layout", "BN-ReLU") else "right")
    for r in rows:
        extra = ((f"{100 * r['fraction_of_matmul_peak']:.1f}%", f"{r['page_faults_per_step']:.0f}") if cpu
                 else ("-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%",))
        t.add_row(r["spatial"], r["mode"], layout_of(r), "fused" if r["fused_bn_relu"] else "aten", f"{r['ms_per_step']:.2f}", f"{r['images_per_s']:.0f}", f"{r['gmacs_per_s']:.1f}", *extra,
                  f"{r['speedup_of_first']:.2f}x")
    show(t)
    path = out or results_dir() / f"train_speed_{device}.csv"
    append_csv(rows, path)
    if cpu:
        console.print(f"matrix-product peak in this run: {rows[0]['matmul_gmacs_per_s']:.1f} GMAC/s (float32 1024^3, "
                      f"{rows[0]['threads']} thread(s)); training MACs per image: "
                      + ", ".join(f"{r['spatial']} {r['train_macs_per_image'] / 1e6:.1f}M" for r in rows if r["mode"] == rows[0]["mode"]
                                 and r["channels_last"] == rows[0]["channels_last"]
                                 and r["fused_bn_relu"] == rows[0]["fused_bn_relu"]))
    for c in speedups(rows):
        line = f"{c['block']} fastest ({c['mode']}) / {c['peer']} fastest ({c['peer_mode']}): {c['vs_fastest']:.2f}x"
        if c["vs_eager"] is not None:
            line += f"; / {c['peer']} eager ({c['eager_mode']}): {c['vs_eager']:.2f}x"
        console.print(line)
    console.print(f"appended {len(rows)} rows to {path} (paper: ASL trains {table2_train_speedup():.2f}x faster than 1B-DW3-B-1)")


def _profile_models_onnx(specs, threads, batch, min_run_time, out, shift_forms) -> None:
    from asl_cli.experiments.bench import results_dir
    from asl_cli.experiments.evaluation.deploy import profile
    from asl_cli.experiments.benchmarks.profile_models import figure, ratios

    with console.status(f"exporting and timing {', '.join(specs)} in ONNX Runtime"):
        rows = profile(list(specs), threads, batch, min_run_time, shift_forms)
    t = Table(title=f"models in {rows[0]['runtime']} (CPU provider), {rows[0]['device_name']}, {threads} thread(s)")
    for c in ("model", "shift form", "params (M)", "MACs (M)", "ms, batch 1", f"ms, batch {batch}", "GMAC/s", "top-1"):
        t.add_column(c, justify="left" if c in ("model", "shift form") else "right")
    for r in rows:
        t.add_row(r["model"], r["shift_form"] + (" *" if r["fastest"] else ""), f"{r['params'] / 1e6:.3f}", f"{r['macs'] / 1e6:.1f}",
                  f"{r['cpu_ms_batch1']:.2f}", f"{r[f'cpu_ms_batch{batch}']:.2f}", f"{r['cpu_gmacs_per_s']:.1f}", fmt(r["top1"]))
    show(t)
    console.print("* the model's fastest form")
    for rr in ratios(rows):
        if rr["kind"] == "fastest":
            console.print(f"latency {rr['pair']}, batch 1: [bold]{rr['ratio']:.3f}x[/] (MACs {rr['macs_ratio']:.2f}x; "
                          f"paper, Caffe: {rr['paper_ratio']:.3f}x)")
    _append_with_figure(rows, out or results_dir() / "profile_models_onnxruntime.csv", figure, "_accuracy_vs_latency")


def _append_with_figure(rows: list[dict], path: Path, figure, suffix: str) -> None:
    """Appends the rows to the CSV and draws their figure beside it."""
    from asl_cli.experiments.bench import append_csv

    append_csv(rows, path)
    for f in figure(rows, path.with_name(path.stem + suffix)):
        console.print(f"wrote {f}")
    console.print(f"appended {len(rows)} rows to {path}")
