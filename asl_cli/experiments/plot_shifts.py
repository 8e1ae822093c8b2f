"""`asl plot-shifts`: paper Fig. 3 (each ASL layer's channels as points (alpha, beta)), how the
shifts moved during training, and per-layer statistics."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from ..train import checkpoint as ckpt_io
from ..train.run_folder import SHIFT_COLUMNS, RunFolder, read_log
from . import figures

STATS_COLUMNS = ["layer", "channels", "mean_abs_shift", "max_abs_shift", "share_beyond_1px", "mean_alpha", "mean_beta"]


def layer_stats(shifts: dict[str, torch.Tensor]) -> pd.DataFrame:
    rows = []
    for name, s in shifts.items():
        s = s.float()
        mag = s.abs().max(dim=1).values  # a channel is "beyond 1 px" when either component is
        rows.append({"layer": name, "channels": s.shape[0], "mean_abs_shift": round(s.abs().mean().item(), 5),
                     "max_abs_shift": round(s.abs().max().item(), 5), "share_beyond_1px": round((mag > 1).float().mean().item(), 5),
                     "mean_alpha": round(s[:, 0].mean().item(), 5), "mean_beta": round(s[:, 1].mean().item(), 5)})
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def _grid(n: int) -> tuple[int, int]:
    cols = min(6, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def _per_layer_figure(names: list[str], draw, title: str, xlabel: str, ylabel: str, stem: Path) -> list[Path]:
    """One square panel per layer: draw(ax, name) plots it and returns its largest |shift|; the
    panel then gets equal axes (beta growing downwards, as in an image) and the integer pixel grid."""
    plt = figures.plt()
    r, c = _grid(len(names))
    fig, axes = plt.subplots(r, c, figsize=(2.6 * c, 2.6 * r), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lim = max(1.5, math.ceil(draw(ax, name) + 0.25))
        ax.set_xlim(-lim, lim)
        ax.set_ylim(lim, -lim)
        ax.set_aspect("equal")
        ax.set_xticks(range(-int(lim), int(lim) + 1))
        ax.set_yticks(range(-int(lim), int(lim) + 1))
        ax.grid(True, color="0.8", linewidth=0.6)
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figures.save(fig, stem)


def scatter_figure(shifts: dict[str, torch.Tensor], title: str, stem: Path) -> list[Path]:
    def draw(ax, name):
        s = shifts[name].float()
        ax.scatter(s[:, 0], s[:, 1], s=6, alpha=0.7)
        return s.abs().max().item()

    return _per_layer_figure(list(shifts), draw, title, "alpha: horizontal shift (px)", "beta: vertical shift (px)", stem)


def movement_figure(history: pd.DataFrame, title: str, stem: Path) -> list[Path]:
    """Each channel's path from the first to the last recorded step, per layer."""
    first, last = history["step"].min(), history["step"].max()

    def draw(ax, name):
        h = history[history["layer"] == name].sort_values(["channel", "step"])
        for _, ch in h.groupby("channel"):
            ax.plot(ch["alpha"], ch["beta"], color="0.6", linewidth=0.5)
        a, b = h[h["step"] == first], h[h["step"] == last]
        ax.scatter(a["alpha"], a["beta"], s=4, color="tab:blue", label=f"step {first}")
        ax.scatter(b["alpha"], b["beta"], s=4, color="tab:red", label=f"step {last}")
        if name == names[0]:
            ax.legend(fontsize=6)
        return h[["alpha", "beta"]].abs().max().max()

    names = list(dict.fromkeys(history["layer"]))
    return _per_layer_figure(names, draw, title, "alpha (px)", "beta (px)", stem)


TRAVEL_COLUMNS = ["step", "layer", "channels", "mean_travel", "spread", "share_beyond_1px"]


def travel_table(history: pd.DataFrame) -> pd.DataFrame:
    """How far the shifts have moved at every recorded step, per layer and over all layers
    ("all"): the mean distance of a channel's (alpha, beta) from where it started, the spread
    (standard deviation of all alpha and beta values) and the share of channels beyond 1 px."""
    h = history.sort_values(["layer", "channel", "step"])
    start = h[h["step"] == h["step"].min()].set_index(["layer", "channel"])[["alpha", "beta"]]
    h = h.join(start.rename(columns={"alpha": "alpha_0", "beta": "beta_0"}), on=["layer", "channel"])
    h["travel"] = ((h["alpha"] - h["alpha_0"]) ** 2 + (h["beta"] - h["beta_0"]) ** 2) ** 0.5
    h["beyond"] = (h[["alpha", "beta"]].abs().max(axis=1) > 1).astype(float)

    def summarize(g):
        vals = pd.concat([g["alpha"], g["beta"]])
        return pd.Series({"channels": len(g), "mean_travel": g["travel"].mean(), "spread": vals.std(ddof=0),
                          "share_beyond_1px": g["beyond"].mean()})

    per_layer = h.groupby(["step", "layer"], sort=False).apply(summarize, include_groups=False).reset_index()
    overall = h.groupby("step").apply(summarize, include_groups=False).reset_index().assign(layer="all")
    out = pd.concat([overall, per_layer], ignore_index=True)[TRAVEL_COLUMNS].sort_values(["layer", "step"], kind="stable")
    out["channels"] = out["channels"].astype(int)
    return out.round(5).reset_index(drop=True)


def shift_budget(cfg: dict, steps) -> tuple[list[float], list[float]]:
    """By each step: the shift budget, the sum of the per-step shift learning rates (lr x schedule
    x shift_lr_mult: the length of every normalised-gradient step, momentum aside), and the
    random-walk length, the square root of the sum of their squares (eta x sqrt(n) at a constant
    rate), which is what decides how far the shifts travel (results/README.md)."""
    from ..train.optim import lr_factor, shift_lr_mult

    o, total = cfg["optim"], cfg["train"]["iterations"] or max(steps)
    f, mult = lr_factor(cfg, total), shift_lr_mult(cfg)  # the rule needs train.iterations, which validation ensures
    rate = [o["lr"] * mult * f(t) for t in range(max(steps, default=0))]
    cum, sq = [0.0], [0.0]
    for r in rate:
        cum.append(cum[-1] + r)
        sq.append(sq[-1] + r * r)
    return [float(f"{cum[k]:.6g}") for k in steps], [float(f"{sq[k] ** 0.5:.6g}") for k in steps]


def compare(targets: list[Path], out_dir: Path, beside: list[Path] = ()) -> dict:
    """Shift travel of several runs side by side (one row per run and recorded step, with the
    run's data set, schedule and shift learning rate) and a figure of travel against steps and
    against the shift budget. `beside`: shift_travel.csv files of earlier comparisons, whose runs
    are drawn and listed too (with their own provenance) where their folders are gone."""
    from ..train.optim import shift_lr_mult
    from ..config import load_config
    from .bench import provenance

    frames = []
    for target in targets:
        ckpt = ckpt_io.load(target, prefer="last")
        hist, problem = read_log(RunFolder(target).shifts, SHIFT_COLUMNS)
        if problem or hist["step"].nunique() < 2:
            raise ckpt_io.CheckpointError(f"{target} has no shift history to compare ({problem or 'one recorded step'})")
        cfg = load_config(ckpt["config"])
        t = travel_table(hist)
        t = t[t["layer"] == "all"].drop(columns="layer")
        t.insert(0, "run", Path(target).name)
        t["shift_budget_px"], t["shift_walk_px"] = shift_budget(cfg, t["step"].tolist())
        pre, s, o = ckpt.get("preprocessing", {}), cfg["schedule"], cfg["optim"]
        t = t.assign(model=ckpt["model_name"], shift_mode=cfg["model"]["args"].get("shift_mode", "TR"), dataset=pre.get("dataset", ""),
                     encoding=pre.get("encoding", ""), iterations=cfg["train"]["iterations"], batch=cfg["train"]["batch_size"],
                     lr=o["lr"], schedule=f"{s['type']} {s['milestones']} x{s['gamma']}", shift_lr_mult=round(shift_lr_mult(cfg), 6),
                     seed=cfg["train"]["seed"], final_test_top1=(ckpt.get("last_row") or {}).get("test_top1"))
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    for k, v in provenance("cpu", None).items():
        if k not in ("threads",):
            table[k] = v
    earlier = []
    for csv in beside:
        try:
            earlier.append(pd.read_csv(csv, dtype={"commit": str}))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ckpt_io.CheckpointError(f"cannot read {csv}: {e}") from e
        missing = {"run", "step", "mean_travel", "shift_budget_px", "shift_walk_px"} - set(earlier[-1].columns)
        if missing:
            raise ckpt_io.CheckpointError(f"{csv} is not a shift_travel.csv of asl plot-shifts (no {', '.join(sorted(missing))})")
    if earlier:
        table = pd.concat([*earlier, table], ignore_index=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "shift_travel.csv"
    table.to_csv(path, index=False)
    plt = figures.plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run_name, g in table.groupby("run", sort=False):
        label = f"{run_name} ({g['iterations'].iloc[0]} it, shift x{g['shift_lr_mult'].iloc[0]:g})"
        for ax, x in zip(axes, ("step", "shift_budget_px", "shift_walk_px")):
            ax.plot(g[x], g["mean_travel"], marker=".", label=label)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("shift budget: sum of per-step shift rates (px)")
    axes[2].set_xlabel("random-walk length: sqrt of the sum of squared rates (px)")
    for ax in axes:
        ax.set_ylabel("mean distance from the start (px)")
        ax.grid(True, color="0.85")
    axes[2].legend(fontsize=7)
    fig.suptitle("How far learned shifts travel", fontsize=10)
    fig.tight_layout()
    return {"files": [str(path)] + [str(f) for f in figures.save(fig, out_dir / "shift_travel")], "table": table}


def run(target: str | Path, out_dir: Path) -> dict:
    ckpt = ckpt_io.load(target, prefer="last")
    shifts = ckpt.get("shifts") or {}
    if not shifts:
        raise ckpt_io.CheckpointError(f"{ckpt['_path']} holds no active shift layers (model {ckpt['model_name']})")
    label = f"{ckpt['model_name']}, " + ("imported from " + Path(ckpt["source"]["file"]).name if ckpt.get("source") else f"step {ckpt.get('step')}")
    mode = shift_mode_of(ckpt["config"]) if ckpt.get("config") else None
    fixed = not learned(mode)
    if fixed:
        label += f", fixed {mode} shifts (not learned)"
    out_dir = Path(out_dir)
    files = scatter_figure(shifts, f"Shifts of every ASL layer: {label}", out_dir / "shifts")
    stats = layer_stats(shifts)
    stats.insert(0, "step", ckpt.get("step"))
    stats.insert(0, "model", ckpt["model_name"])
    stats_path = out_dir / "shift_stats.csv"
    stats.to_csv(stats_path, index=False)
    files.append(stats_path)
    notes = []
    hist_path = RunFolder(target).shifts if Path(target).is_dir() else None
    if hist_path is not None and hist_path.exists():
        hist, problem = read_log(hist_path, SHIFT_COLUMNS)
        if problem:
            notes.append(f"{problem}: no shift movement figure")
        elif hist["step"].nunique() > 1:
            title = f"Shift movement during training: {ckpt['model_name']}"
            if fixed:
                title += f" (fixed {mode} shifts: they are not learned, so they do not move)"
                notes.append(f"the run's {mode} shifts are fixed, so the movement figure shows no movement")
            files += movement_figure(hist, title, out_dir / "shift_movement")
            travel_path = out_dir / "shift_travel.csv"
            travel_table(hist).to_csv(travel_path, index=False)
            files.append(travel_path)
    return {"files": [str(f) for f in files], "stats": stats, "notes": notes}


def shift_mode_of(cfg: dict) -> str | None:
    """The shift variant a run's config trains (TR, SR, ...), None when unknown."""
    from ..config import _model_args

    mode = _model_args(cfg).get("shift_mode")
    return str(mode).upper() if mode is not None else None


def learned(mode: str | None) -> bool:
    from ..nn import SHIFT_MODES

    return mode is None or SHIFT_MODES.get(mode, (None, None, True))[2]


def newest_run(root: Path) -> tuple[Path, str]:
    """The run folder under `root` (sweeps' and ablations' included) whose last checkpoint was
    written most recently among those whose shifts are learned (else the newest of all), and a
    line saying which was chosen and why."""
    from ..config import ConfigError

    found = sorted(root.glob("**/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise ckpt_io.CheckpointError(f"no run with a checkpoint under {root}/; train one with `asl train`, "
                                      f"or name a run folder or checkpoint: asl plot-shifts RUN_DIR|CHECKPOINT")
    runs = [p.parent.parent for p in reversed(found)]

    def mode(run: Path) -> str | None:
        try:
            return shift_mode_of(RunFolder(run).load_config())
        except (ConfigError, OSError):
            return None

    newest = runs[0]
    for run in runs:
        if learned(mode(run)):
            if run == newest:
                return run, f"plotting the newest run: {run}"
            return run, (f"plotting the newest run with learned shifts: {run} (the newest run, {newest}, holds fixed "
                         f"{mode(newest)} shifts)")
    return newest, f"plotting the newest run: {newest} (no run under {root}/ learns its shifts; its {mode(newest)} shifts are fixed)"
