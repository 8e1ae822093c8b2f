"""`asl info`, `asl zoo`, `asl import-caffe` and `asl predict`: the installation, the model zoo and
trained models."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .app import Runtime, app, console, fail, fmt, show


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
        t.add_row(r["name"], r["dataset"], f"{r['input_size']}", f"{r['params'] / 1e6:.4f}", fmt(r["paper_params_m"]),
                  f"{r['macs'] / 1e6:.1f}", fmt(r["paper_macs_m"]))
    show(t)
    if csv is not None:
        import pandas as pd

        csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(csv, index=False)
        console.print(f"wrote {csv}")


@app.command(name="import-caffe")
def import_caffe(
    model_file: Path = typer.Argument(..., metavar="MODEL.caffemodel", help="The authors' trained AS-ResNet in Caffe's binary format."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Zoo architecture (default: from the file's base width, e.g. as_resnet_w32)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (default: checkpoints/<arch>-caffe.pt)."),
) -> None:
    """Convert a Caffe AS-ResNet model into a checkpoint for eval, predict, profile, plot-shifts and fine-tuning."""
    from asl_cli.experiments.caffe.importer import import_model, to_checkpoint

    model, report = import_model(model_file, arch)
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
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", help="torch, or onnxruntime: the checkpoint exported to standard ONNX "
                                "(or a file written by asl export) run in ONNX Runtime's CPU provider."),
) -> None:
    """Classify images with a checkpoint, using the preprocessing recorded in it.

    Examples: asl predict checkpoints/w32.pt cat.jpg; asl predict w32.onnx cat.jpg --runtime onnxruntime
    """
    import json

    from asl_cli.experiments.evaluation.predict import predict as run_predict

    if str(checkpoint).endswith(".onnx") and runtime != Runtime.onnxruntime:
        fail("an .onnx file runs in ONNX Runtime: add --runtime onnxruntime", code=2)
    if runtime == Runtime.onnxruntime:
        from asl_cli.experiments.evaluation.deploy import predict as ort_predict

        rows = ort_predict(checkpoint, images, topk)
    else:
        rows = run_predict(checkpoint, images, topk)
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


@app.command(name="export")
def export_model(
    model: str = typer.Argument(..., metavar="MODEL|CHECKPOINT", help="A zoo model (see asl zoo), a checkpoint file or a run folder."),
    fmt_: str = typer.Option("onnx", "--format", help="The file format; onnx is the one there is."),
    out: Optional[Path] = typer.Option(None, "--out", help="The file to write (default exports/<model>.onnx under this folder)."),
    shift_form: str = typer.Option("conv", "--shift-form", help="How the active shift is written in standard ONNX: conv (one "
                                   "depthwise convolution spanning the shifts' offsets) or slice (pad once, a slice per "
                                   "group of channels sharing an offset, a 2x2 depthwise blend); see docs/export.md."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input height and width (default: the model's, e.g. 32 or 224)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the file in ONNX Runtime and compare with PyTorch."),
) -> None:
    """Write a model as a standard ONNX file (evaluation mode, BatchNorm folded into the convolutions
    before it, the shifts as standard operators: any runtime loads it with no plugin).

    Examples: asl export asnet20_16x1; asl export runs/RUN --out model.onnx; asl export checkpoints/w32.pt
    """
    from asl_cli.export import SHIFT_FORMS
    from asl_cli.experiments.evaluation.deploy import export

    if fmt_ != "onnx":
        fail(f"--format must be onnx, got {fmt_!r}", code=2)
    if shift_form not in SHIFT_FORMS:
        fail(f"--shift-form must be one of {', '.join(SHIFT_FORMS)}, got {shift_form!r}", code=2)
    target = out or Path("exports") / f"{Path(model.rstrip('/')).stem}.onnx"
    with console.status(f"exporting {model} to ONNX"):
        info = export(model, target, shift_form, size, check)
    console.print(f"wrote {info['path']}: {info['arch']}, input 1x3x{info['input_size']}x{info['input_size']} (batch "
                  f"dynamic), opset {info['opset']}, {info['nodes']} nodes, shift form {shift_form}")
    console.print(f"operators: {', '.join(info['ops'])}")
    if check:
        ok = info["max_rel_diff"] <= 1e-4
        console.print(f"ONNX Runtime against PyTorch on random inputs: largest difference {info['max_rel_diff']:.2e} of the "
                      f"logits' scale ({'within' if ok else 'beyond'} 1e-4)")
        if not ok:
            raise typer.Exit(1)
