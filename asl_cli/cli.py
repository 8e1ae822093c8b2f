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
    err.print(f"[bold red]error:[/] {message}")
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
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads (the paper uses one)."),
    min_run_time: float = typer.Option(1.0, "--min-run-time", min=0.01, help="Seconds of timing per measurement."),
    out: Optional[Path] = typer.Option(None, "--out", help="CSV to append to (default results/profile_op_<device>.csv)."),
) -> None:
    """Measure speed against peers timed in the same run; print ratios and append a CSV."""
    if op is None and layer is None and not model:
        fail("say what to profile: --op asl, --layer NAME or --model NAME", code=2)
    if layer is not None or model:
        not_available("profile --layer/--model")
    if op != "asl":
        fail(f"unknown --op {op!r}; the only operator is 'asl'", code=2)
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}", code=2)
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train a zoo model from a YAML recipe (not available yet)."""
    not_available("train")


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_(ctx: typer.Context) -> None:
    """Evaluate a run folder or checkpoint (not available yet)."""
    not_available("eval")


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
