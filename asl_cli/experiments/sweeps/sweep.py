"""`asl sweep`: one recipe trained over the product of override axes x seeds, several runs at once,
summarised per cell with mean, standard deviation, a 95% confidence interval and Welch's t-test
against a baseline cell.

Each run has its own folder `<root>/<cell>-seed<k>`: a finished run (its last checkpoint is the
final evaluation) is reused, an interrupted one resumed. With `jobs > 1` every run is a separate
process (one small network leaves a GPU mostly idle, so several share it; with several GPUs
visible the runs are spread over them; on the CPU the cores are divided between them); each
worker writes `progress.json` into its folder, from which the live view is drawn.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ...train import checkpoint as ckpt_io
from ...train.run_folder import RunFolder
from ...config import ConfigError, load_config
from ...errors import Interrupted
from .stats import summarize, welch


@dataclass
class Axis:
    key: str
    values: list[str]  # as typed: each becomes the override key=value

    @classmethod
    def parse(cls, text: str) -> "Axis":
        if "=" not in text:
            raise ConfigError(f"axis {text!r} must look like key=v1,v2,... e.g. model.args.shift_mode=GS,SI,SR,TR")
        key, raw = text.split("=", 1)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"axis {key} has no values")
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise ConfigError(f"axis {key} repeats {', '.join(dup)}: each value is one cell")
        return cls(key.strip(), values)


@dataclass
class Run:
    cell: str
    values: dict[str, str]
    seed: int
    run_dir: Path
    overrides: list[str]  # the recipe's overrides, the cell's and the seed's, then output.dir
    cfg: dict
    state: str = "queued"  # queued | reused | running | resuming | done | failed | interrupted (job executors)
    message: str = ""
    progress: dict = field(default_factory=dict)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


def cell_name(values: dict[str, str]) -> str:
    return "-".join(str(v).replace("/", "_") for v in values.values())


def plan(recipe: str, overrides: list[str], axes: list[Axis], seeds: int, root: Path,
         seed_keys: tuple[str, ...] = ("train.seed",)) -> list[Run]:
    """Every (cell, seed) run, its resolved config checked before anything trains."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"an axis is given twice: {', '.join(keys)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    runs = []
    for combo in itertools.product(*[a.values for a in axes]) if axes else [()]:
        values = dict(zip(keys, combo))
        name = cell_name(values) or "base"
        for seed in range(seeds):
            run_dir = root / f"{name}-seed{seed}"
            ov = list(overrides) + [f"{k}={v}" for k, v in values.items()] + [f"{k}={seed}" for k in seed_keys]
            ov.append(f"output.dir={run_dir}")
            runs.append(Run(name, values, seed, run_dir, ov, load_config(recipe, ov)))
    return runs


def finished(run_dir: Path) -> dict | None:
    """The last checkpoint of a run whose final evaluation is done, else None."""
    last = RunFolder(run_dir).last
    if not last.exists():
        return None
    try:
        ck = ckpt_io.load(last)
    except ckpt_io.CheckpointError:
        return None
    if ck.get("last_row") and ck["step"] >= ck.get("total_steps", float("inf")):
        return ck
    return None


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config of the run in `run_dir` when there is one to reuse or resume (it has a
    checkpoint), else None."""
    folder = RunFolder(run_dir)
    if not folder.has_checkpoint():
        return None
    if folder.config_file.exists():
        try:
            return folder.load_config()
        except ConfigError as e:
            raise ConfigError(f"{folder.config_file} cannot be read ({e}), so it is unknown what the run in {run_dir} was trained "
                              f"with; move that folder away or rerun with --rerun") from None
    try:  # a damaged checkpoint raises its own CheckpointError
        return load_config(ckpt_io.load(folder.last)["config"])
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{run_dir} holds a checkpoint but no readable config.yaml ({e}); move that folder away "
                          f"or rerun with --rerun") from None


def move_aside(run_dir: Path) -> Path:
    """Renames a run folder to <name>.replaced-<time> beside it (kept, not deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, i = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 2
    while dest.exists():
        dest, i = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{i}"), i + 1
    run_dir.rename(dest)
    return dest


def check_reuse(runs: list[Run], rerun: bool, on_status: Callable[[str], None] = lambda s: None,
                busy: Callable[[Run], bool] = lambda r: False) -> None:
    """Before any run is reused or resumed: a run folder whose run was trained with other
    settings than this command asks for (keys that change training; not paths or the executor)
    stops the command with the differing keys, or with `rerun` is moved aside and trained anew.
    A folder a live job is still training is never moved."""
    from ...config import format_differences, training_differences

    conflicts = []
    for r in runs:
        saved = saved_config(r.run_dir)
        if saved is None:
            continue
        diffs = training_differences(saved, r.cfg)
        if diffs:
            conflicts.append((r, diffs))
    if not conflicts:
        return
    if not rerun:
        lines = [f"{r.run_dir}: {format_differences(d)}" for r, d in conflicts[:5]]
        more = f"\n  ... and {len(conflicts) - 5} more run(s)" if len(conflicts) > 5 else ""
        raise ConfigError(
            f"{len(conflicts)} existing run(s) were trained with other settings than this command asks for "
            f"(saved -> asked):\n  " + "\n  ".join(lines) + more +
            "\nEither give the runs another folder (--root DIR), or pass --rerun to move the old runs aside "
            "(renamed to <run>.replaced-<time>) and train them anew.")
    live = [r for r, _ in conflicts if busy(r)]
    if live:
        raise ConfigError(f"{live[0].run_dir} is still being trained by a job with its old settings; wait for it or cancel "
                          f"it before --rerun moves it aside")
    for r, diffs in conflicts:
        dest = move_aside(r.run_dir)
        on_status(f"{r.cell} seed {r.seed}: trained with other settings ({format_differences(diffs, 3)}); "
                  f"moved aside to {dest}, training anew")


def prepare(run: Run) -> Path | None:
    """The folder to resume from, or None for a fresh start (leftover logs of a run that never
    checkpointed are removed so they cannot mix with the new one)."""
    if run.folder.has_checkpoint():
        return run.run_dir
    run.folder.clear_unfinished()
    return None


# ---------------------------------------------------------------------------------------------
# parallel execution: one worker process per run
# ---------------------------------------------------------------------------------------------
def _worker_env(slot: int, jobs: int, device_kind: str, gpus: int) -> dict:
    env = dict(os.environ)
    if device_kind == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    elif gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def run_parallel(recipe: str, runs: list[Run], jobs: int, device_kind: str, gpus: int,
                 on_tick: Callable[[list[Run]], None] = lambda runs: None, poll_s: float = 0.5) -> None:
    """Runs every queued run in worker processes, at most `jobs` at a time; calls on_tick with the
    runs' states about every poll_s seconds. A failed run is marked, the others go on."""
    queue = [r for r in runs if r.state == "queued"]
    active: dict[int, tuple[Run, subprocess.Popen, object]] = {}
    free_slots = list(range(jobs))
    try:
        while queue or active:
            while queue and free_slots:
                run, slot = queue.pop(0), free_slots.pop(0)
                resume = prepare(run)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "asl_cli.experiments.sweeps.sweep_worker", "--progress", str(run.folder.progress)]
                cmd += ["--resume", str(resume)] if resume else ["--", recipe, *run.overrides]
                log = open(run.run_dir / "sweep.log", "a")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(slot, jobs, device_kind, gpus))
                run.state = "resuming" if resume else "running"
                active[slot] = (run, proc, log)
            for slot, (run, proc, log) in list(active.items()):
                run.progress = read_progress(run.run_dir)
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                run.state = "done" if rc == 0 else "failed"
                if rc != 0:
                    run.message = log_tail([run.run_dir / "sweep.log"])
                del active[slot]
                free_slots.append(slot)
            on_tick(runs)
            if queue or active:
                time.sleep(poll_s)
    finally:  # Ctrl-C: stop the workers; each saves a checkpoint on SIGTERM and resumes next time
        for run, proc, log in active.values():
            if proc.poll() is None:
                proc.terminate()
        for run, proc, log in active.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def read_progress(run_dir: Path) -> dict:
    try:
        return json.loads(RunFolder(run_dir).progress.read_text())
    except (OSError, ValueError):
        return {}


def log_tail(paths: list[Path], lines: int = 3, skip: str | None = None) -> str:
    """The last non-blank lines of some logs (read in order), without those containing `skip`,
    joined into one line."""
    text = []
    for path in paths:
        try:
            text += [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip() and not (skip and skip in ln)]
        except OSError:
            continue
    return " | ".join(text[-lines:])


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def schedule_text(cfg: dict) -> str:
    t, s, o = cfg["train"], cfg["schedule"], cfg["optim"]
    length = f"{t['iterations']} it" if t["iterations"] is not None else f"{t['epochs']} ep"
    sched = s["type"] + (f" {s['milestones']} x{s['gamma']}" if s["type"] == "multistep" else "")
    from ...train.optim import shift_lr_mult

    mult = shift_lr_mult(cfg)
    return (f"{length} x b{t['batch_size']}, lr {o['lr']} {sched}" + (f", warmup {s['warmup']}" if s["warmup"] else "")
            + (f", shifts x{mult:.4g}" if mult != 0.01 else ""))


def per_run(runs: list[Run]) -> pd.DataFrame:
    from ...zoo import count_parameters

    rows = []
    for r in runs:
        ck = finished(r.run_dir)
        if ck is None:
            continue
        row = ck["last_row"]
        pre = ck.get("preprocessing", {})
        rows.append({"cell": r.cell, **r.values, "seed": r.seed, "top1": row["test_top1"], "top5": row["test_top5"],
                     "params": count_parameters(ckpt_io.build_model(ck)), "dataset": pre.get("dataset", ""),
                     "encoding": pre.get("encoding", ""), "run_dir": str(r.run_dir)})
    return pd.DataFrame(rows)


def summary_table(runs: list[Run], df: pd.DataFrame, baseline: str | None, recipe: str, overrides: list[str],
                  paper: dict[str, float] | None = None, paper_label: str = "") -> pd.DataFrame:
    """One row per cell: mean, std, 95% CI over seeds; difference to the baseline cell and
    Welch's two-sided p-value; the paper's figure where it has one."""
    cells = list(dict.fromkeys(r.cell for r in runs))
    if baseline is not None and baseline not in cells:
        raise ConfigError(f"baseline {baseline!r} is not a cell of this sweep ({', '.join(cells)})")
    by_cell = {c: df[df["cell"] == c] if len(df) else df for c in cells}
    base = by_cell[baseline]["top1"].tolist() if baseline is not None and len(by_cell[baseline]) else []
    out = []
    for c in cells:
        d = by_cell[c]
        first = next(r for r in runs if r.cell == c)
        row = {"cell": c, **first.values, "seeds": len(d)}
        if len(d):
            s1, s5 = summarize(d["top1"].tolist()), summarize(d["top5"].tolist())
            row.update(top1_mean=round(s1.mean, 3), top1_std=round(s1.std, 3), top1_ci95_low=round(s1.ci_low, 3),
                       top1_ci95_high=round(s1.ci_high, 3), top5_mean=round(s5.mean, 3), top5_std=round(s5.std, 3),
                       params=int(d["params"].iloc[0]),
                       top1_runs=";".join(f"{v:.2f}" for v in d.sort_values("seed")["top1"]))
            if baseline is not None and base and c != baseline:  # no test of the baseline against itself
                diff, p = welch(d["top1"].tolist(), base)
                row.update(baseline=baseline, diff_vs_baseline=round(diff, 3), p_welch=round(p, 4) if p == p else p)
            elif baseline is not None:
                row.update(baseline=baseline)
        if paper is not None:
            row["paper_top1"] = paper.get(c)
            row["paper_source"] = paper_label
        row.update(recipe=recipe, overrides=" ".join(overrides), schedule=schedule_text(first.cfg),
                   dataset=";".join(sorted(set(d["dataset"]))) if len(d) else "",
                   encoding=";".join(sorted(set(d["encoding"]))) if len(d) else "",
                   run_dirs=";".join(d["run_dir"]) if len(d) else "")
        out.append(row)
    return pd.DataFrame(out)


def add_provenance(summary: pd.DataFrame, failed: list[Run]) -> None:
    """Adds the machine's columns to a summary and, when runs failed, each cell's failed runs and
    why (`failed_runs`), beside its statistics over the finished ones."""
    from ...train.distributed import Dist, pick_device
    from ..bench import provenance

    for k, val in provenance(str(pick_device("auto", Dist())), None).items():
        summary[k] = val
    if failed:
        cells = summary["variant" if "variant" in summary else "cell"]
        errors = {c: "; ".join(f"seed {r.seed}: {r.message}" for r in failed if r.cell == c) for c in cells}
        summary["failed_runs"] = [errors[c] for c in cells]


def plot_summary(summary: pd.DataFrame, path_stem: Path, title: str, paper_label: str = "") -> list[Path]:
    """Bars of the mean top-1 per cell with 95% confidence intervals; the paper's figures as
    hatched bars beside them where it has them. PNG and SVG."""
    from .. import figures

    plt = figures.plt()
    s = summary.dropna(subset=["top1_mean"]).reset_index(drop=True)
    # one seed gives no interval: the bar alone, without an error bar
    lo, hi = s["top1_ci95_low"].fillna(s["top1_mean"]), s["top1_ci95_high"].fillna(s["top1_mean"])
    has_paper = "paper_top1" in s and s["paper_top1"].notna().any()
    w = 0.38 if has_paper else 0.6
    fig, ax = plt.subplots(figsize=(1.3 * len(s) + 2.5, 4.0))
    x = list(range(len(s)))
    err = [s["top1_mean"] - lo, hi - s["top1_mean"]]
    dx = -w / 2 if has_paper else 0
    seeds = int(s["seeds"].max()) if "seeds" in s and len(s) else 0
    what = "mean, 95% CI over seeds" if seeds > 1 else "one seed, no interval"
    ax.bar([i + dx for i in x], s["top1_mean"], w, yerr=err, capsize=4, color="#4477aa",
           label=f"ours: {what} ({s['dataset'].iloc[0] if len(s) else ''})")
    for i, r in s.iterrows():  # above the error bar's cap, not on it
        ax.annotate(f"{r['top1_mean']:.1f}", (i + dx, hi[i]), xytext=(0, 5), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    lows, highs = list(lo), list(hi)
    if has_paper:
        pv = s["paper_top1"].astype(float)
        ax.bar([i + w / 2 for i in x], pv.fillna(0), w, color="white", edgecolor="#aa3377", hatch="//", label=paper_label or "paper")
        lows += [v for v in pv if v == v]
        highs += [v for v in pv if v == v]
    ax.set_xticks(x, s["cell"])
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(max(0.0, min(lows) - 5), min(104.0, max(highs) + 4))
    ax.set_title(title, fontsize=9)
    # below the axes, where no bar can be under it
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    return figures.save(fig, path_stem)


# ---------------------------------------------------------------------------------------------
def execute(recipe: str, runs: list[Run], jobs: int, train_one: Callable[[dict, Path | None], object],
            on_status: Callable[[str], None] = lambda s: None, on_tick: Callable[[list[Run]], None] = lambda runs: None) -> list[Run]:
    """Trains what is missing: in this process one after another (jobs == 1, train_one(cfg,
    resume_dir_or_None)), or in `jobs` worker processes. Returns the runs that failed."""
    for r in runs:
        if finished(r.run_dir) is not None:
            r.state = "reused"
            on_status(f"{r.cell} seed {r.seed}: finished earlier, reused ({r.run_dir})")
    queued = [r for r in runs if r.state == "queued"]
    if not queued:
        return []
    if jobs == 1:
        for r in queued:
            resume = prepare(r)
            on_status(f"{r.cell} seed {r.seed}: {'resuming' if resume else 'training'} in {r.run_dir}")
            try:
                train_one(r.cfg, resume)
            except Interrupted as e:
                e.next_step = "Run the same command again to continue."
                raise
            r.state = "done"
        return []
    import torch

    from ...train.distributed import device_kind

    kind = device_kind(queued[0].cfg["train"]["device"])
    run_parallel(recipe, runs, jobs, kind, torch.cuda.device_count() if kind == "cuda" else 0, on_tick)
    return [r for r in runs if r.state == "failed"]
