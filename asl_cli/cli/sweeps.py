"""`asl sweep` and `asl ablate`: grids of runs, on this machine or as cluster jobs, summarised with
statistics."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .runs import train_with_progress
from .app import app, console, err, fail, show, split_recipe


def _elapsed(progress: dict) -> str:
    """Training time over every attempt of the run (a requeued or resubmitted job adds its own)."""
    if "elapsed_s" not in progress:
        return ""
    n = progress.get("attempts", 1)
    return f"{progress['elapsed_s']:.0f} s" + (f" ({n} jobs)" if n > 1 else "")


def _live_view(runs) -> Table:
    t = Table(title="runs", show_lines=False)
    notes = any(r.message for r in runs)
    for c in ("run", "state", "step", "train top-1", "test top-1", "img/s", "elapsed") + (("note",) if notes else ()):
        t.add_column(c)
    for r in runs:
        p = r.progress
        step = f"{p.get('step', 0)}/{p['total']}" if p.get("total") else ""
        t.add_row(f"{r.cell} seed {r.seed}", r.state, step, str(p.get("train_top1", "")), str(p.get("test_top1", "")),
                  str(p.get("images_per_s", "")), _elapsed(p),
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
                            "process; cluster: slurm where Slurm is installed, else local. Needs pip install 'asl-cli\\[cluster]'.")
WAIT_OPT = typer.Option(None, "--wait/--no-wait", help="With a job executor, wait for the jobs with a live table (default: "
                        "return once submitted; run the same command again to collect the summary).")
STATUS_OPT = typer.Option(False, "--status", help="Show each run's state (done, running, pending, interrupted: resumes on the next call, failed, queued) and submit nothing.")
PARTITION_OPT = typer.Option(None, "--partition", help="Slurm partition (default: the recipe's cluster.partition).")
TIME_OPT = typer.Option(None, "--time", min=1, metavar="MINUTES", help="Each job's time limit; a job that reaches it saves a "
                        "checkpoint and requeues itself (default: cluster.timeout_min).")
GPUS_OPT = typer.Option(None, "--gpus-per-node", min=0, help="GPUs per job, one process each with DistributedDataParallel.")
CPUS_OPT = typer.Option(None, "--cpus-per-task", min=1, help="CPUs per process of a job.")
NODES_OPT = typer.Option(None, "--nodes", min=1, help="Nodes per job.")
MEM_OPT = typer.Option(None, "--mem-gb", min=0.01, help="Memory per job in GB (default: cluster.mem_gb). Without a memory "
                       "request a Slurm cluster may give each job a whole node, so jobs then run one at a time.")
RERUN_OPT = typer.Option(False, "--rerun", help="Runs already in the folder that were trained with other settings "
                         "(keys that change training) are moved aside to <run>.replaced-<time> and trained anew; "
                         "without it such runs stop the command, and only runs trained as asked are reused or resumed.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace the summary CSV and figure even where the CSV is a "
                             "result committed to git (by default the new summary is then written beside it).")


def _grid(executor, wait, status, partition, time_min, gpus, cpus, nodes, mem_gb=None, rerun=False) -> dict:
    return {"executor": executor.value, "wait": wait, "status": status, "rerun": rerun,
            "resources": dict(partition=partition, timeout_min=time_min, gpus_per_node=gpus, cpus_per_task=cpus, nodes=nodes,
                              mem_gb=mem_gb)}


def _log_changes():
    """For a log file: one line whenever a run changes state."""
    seen: dict = {}

    def log(rs):
        for r in rs:
            if seen.get(id(r)) != r.state:
                seen[id(r)] = r.state
                top1 = r.progress.get("test_top1")
                console.print(f"{r.cell} seed {r.seed}: {r.state}" + (f" (test top-1 {top1})" if r.state == "done" and top1 is not None else "")
                              + (f": {r.message}" if r.state in ("failed", "interrupted") else ""), highlight=False)
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
    from asl_cli.experiments.sweeps import cluster
    from asl_cli.experiments.sweeps.sweep import check_reuse, execute

    status = lambda m: console.print(f"[bold]{m}[/]", highlight=False)  # noqa: E731
    if grid["status"]:
        cluster.refresh(runs)
        show(_live_view(runs))
        return None
    check_reuse(runs, grid["rerun"], status, busy=cluster.job_alive if grid["executor"] != "pool" else lambda r: False)
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
        failed = [r for r in runs if r.state in ("failed", "interrupted")]
    elif jobs == 1:
        failed = execute(recipe, runs, 1, lambda cfg, resume: train_with_progress(run_training, cfg, resume, None, show=True),
                         on_status=status)
    else:
        failed = _watch(lambda tick: execute(recipe, runs, jobs, None, on_status=status, on_tick=tick), runs)
    for r in failed:
        log = r.run_dir / "sweep.log" if grid["executor"] == "pool" else root / ".jobs"
        err.print(f"[bold red]{r.cell} seed {r.seed} failed[/] (log: {log}): {r.message}", highlight=False)
    return failed


def _something_finished(runs, failed) -> None:
    """A summary needs one finished run; when every run failed the command ends with one message."""
    from asl_cli.errors import TrainingError

    if failed and len(failed) == len(runs):
        raise TrainingError(f"every run failed ({len(runs)}; why, above), so there is nothing to summarise; "
                            "fix the cause and run the same command again")


def _write_summary(summary, csv: Path, title: str, paper_label: str, overwrite: bool) -> None:
    from asl_cli.experiments.outputs import writable
    from asl_cli.experiments.sweeps.sweep import plot_summary

    target = writable(csv, overwrite)
    csv = target.path
    csv.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(csv, index=False)
    paths = plot_summary(summary.rename(columns={"variant": "cell"}) if "cell" not in summary else summary,
                         csv.with_name(csv.stem), title, paper_label) if "top1_mean" in summary and summary["top1_mean"].notna().any() else []
    if target.note:
        console.print(f"[yellow]note:[/] {target.note}", highlight=False)
    console.print(f"wrote {csv}" + "".join(f", {p}" for p in paths), highlight=False)


def _nan(v) -> bool:
    return v is None or v != v


def _num(v) -> str:
    """A statistic, or n/a where one seed gives none."""
    return "n/a" if _nan(v) else f"{v:.2f}"


def _versus(r, first_col: str) -> str:
    if r.get("baseline") == r[first_col]:
        return "baseline"
    if _nan(r.get("diff_vs_baseline")):
        return ""
    p = r.get("p_welch")
    return f"{r['diff_vs_baseline']:+.2f} (p={'n/a' if _nan(p) else f'{p:.3g}'})"


def _summary_table(summary, title: str, first_col: str) -> Table:
    """The summary in a terminal (80 columns suffice; top-5 and the rest are in the CSV)."""
    from rich import box

    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, padding=(0, 1))
    for c in (first_col, "seeds", "top-1 ± std", "95% CI", "vs baseline (p)", "params", "paper"):
        t.add_column(c, no_wrap=True)
    for _, r in summary.iterrows():
        if r["seeds"] == 0:
            t.add_row(str(r[first_col]), "0", "", "", "", "", "")
            continue
        paper = r.get("paper_top1")
        t.add_row(str(r[first_col]), str(r["seeds"]), f"{r['top1_mean']:.2f} ± {_num(r['top1_std'])}",
                  "n/a" if _nan(r["top1_ci95_low"]) else f"{r['top1_ci95_low']:.2f}-{r['top1_ci95_high']:.2f}",
                  _versus(r, first_col), str(r["params"]), "" if paper is None or _nan(paper) else f"{paper}")
    return t


def _finish_sweep(summary, failed, csv: Path, title: str, paper_label: str, first_col: str, overwrite: bool) -> None:
    from asl_cli.experiments.sweeps.sweep import add_provenance

    add_provenance(summary, failed)
    show(_summary_table(summary, title, first_col))
    _write_summary(summary, csv, title, paper_label, overwrite)
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
    cpus_per_task: Optional[int] = CPUS_OPT, nodes: Optional[int] = NODES_OPT, mem_gb: Optional[float] = MEM_OPT,
    rerun: bool = RERUN_OPT, overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Train a recipe over override axes x seeds and summarise each cell (mean, std, 95% CI,
    Welch t-test against a baseline cell), with a figure. Finished runs are reused, interrupted
    ones resumed: run the same command again to continue.

    Example: asl sweep asnet20_16x1 data.dataset=folder data.path=cifar10 --axis model.args.spatial=asl,dw3_bn,dw3 --seeds 2 --jobs 2
    """
    from asl_cli.config import ConfigError
    from asl_cli.experiments.sweeps.sweep import Axis, per_run, plan, summary_table
    from asl_cli.zoo.paper import TABLE2

    recipe, overrides = split_recipe(args)
    if recipe is None:
        fail("name the recipe first, e.g. asl sweep quick --axis optim.lr=0.05,0.1", code=2)
    name = Path(recipe).stem
    root = root or Path("runs") / f"sweep-{name}"
    axes = [Axis.parse(a) for a in axis]

    def work():
        runs = plan(recipe, overrides, axes, seeds, root, tuple(seed_key))
        cells = list(dict.fromkeys(r.cell for r in runs))
        base = baseline if baseline is not None else cells[0]
        if base not in cells:
            raise ConfigError(f"--baseline {base!r} is not a cell of this sweep ({', '.join(cells)})")
        failed = _run_sweep(recipe, runs, jobs, grid, root)
        if failed is None:
            return None, runs
        _something_finished(runs, failed)
        return summary_table(runs, per_run(runs), base, recipe, overrides, paper, label), failed

    grid = _grid(executor, wait, status, partition, time_min, gpus_per_node, cpus_per_task, nodes, mem_gb, rerun)
    paper = {k: v["c10"] for k, v in TABLE2.items()} if [a.key for a in axes] == ["model.args.spatial"] else None
    label = "paper Table 2 (ASNet-20 b88, CIFAR-10, full schedule)" if paper else ""
    summary, failed = work()
    if summary is not None:
        _finish_sweep(summary, failed, csv or Path("results") / f"sweep_{name}.csv",
                      title or f"{name}: " + " x ".join(a.key for a in axes) + f" ({seeds} seed(s))", label, "cell", overwrite)


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
    cpus_per_task: Optional[int] = CPUS_OPT, nodes: Optional[int] = NODES_OPT, mem_gb: Optional[float] = MEM_OPT,
    rerun: bool = RERUN_OPT, overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Train the shift variants of one recipe and write a Table-4-style CSV and figure; finished
    runs are reused (the shift-variant preset of `asl sweep`).

    Examples: asl ablate --variant SR; asl ablate cifar10_cpu data.path=DIR --seeds 3 --jobs 2
    """
    from asl_cli.experiments.sweeps.ablate import PAPER_LABEL, parse_variants, pick_baseline, plan_variants, variant_columns
    from asl_cli.experiments.sweeps.sweep import per_run, summary_table
    from asl_cli.zoo.paper import TABLE4

    from asl_cli.config import DEFAULT_RECIPE

    recipe, overrides = split_recipe(args)
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
        _something_finished(runs, failed)
        return variant_columns(summary_table(runs, per_run(runs), base, recipe, overrides, TABLE4, PAPER_LABEL)), failed

    grid = _grid(executor, wait, status, partition, time_min, gpus_per_node, cpus_per_task, nodes, mem_gb, rerun)
    summary, failed = work()
    if summary is not None:
        _finish_sweep(summary, failed, csv or Path("results") / f"ablate_{name}.csv",
                      f"shift ablation: {name} ({seeds} seed(s))", PAPER_LABEL, "variant", overwrite)
