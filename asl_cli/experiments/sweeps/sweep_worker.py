"""One run of a sweep in its own process: `python -m asl_cli.experiments.sweeps.sweep_worker --progress
FILE (--resume RUN_DIR | -- RECIPE KEY=VALUE...)`. Writes its progress to FILE (JSON, replaced
atomically) for the sweep's live view; exit status 0 when the run finished, 130 when stopped by a
signal (it saves a checkpoint first), 1 on an error (the message on stderr)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def earlier_attempts(path: Path) -> dict:
    """What a progress record says of the attempts before this one (a requeued or resubmitted job
    goes on with the same run): their training time and how many there were."""
    try:
        old = json.loads(path.read_text())
        return {"elapsed_s": float(old.get("elapsed_s", 0.0)), "attempts": int(old.get("attempts", 1))}
    except (OSError, ValueError, TypeError, AttributeError):
        return {"elapsed_s": 0.0, "attempts": 0}


def mark_resubmitted(path: Path) -> None:
    """Before a run's job is resubmitted: keep its time over earlier attempts, drop its progress
    (the new job reports its own once it starts)."""
    done = earlier_attempts(path)
    if done["attempts"]:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"elapsed_s": done["elapsed_s"], "attempts": done["attempts"]}))
        os.replace(tmp, path)


def progress_writer(path: Path) -> dict:
    """Training callbacks (engine.Callbacks' keyword arguments) that keep `path` a JSON record of
    the run's progress, replaced atomically, for the sweep's live view and `--status`. Elapsed
    time counts every attempt of the run (a requeued job adds to what the earlier ones took)."""
    before = earlier_attempts(path)
    state = {"step": 0, "total": None, "t0": time.time(), "attempts": before["attempts"] + 1}

    def write(**kw):
        state.update(kw)
        tmp = path.with_name(f".{path.name}.tmp")
        elapsed = before["elapsed_s"] + time.time() - state["t0"]
        tmp.write_text(json.dumps({k: v for k, v in state.items() if k != "t0"} | {"elapsed_s": round(elapsed, 1)}))
        os.replace(tmp, path)

    return dict(on_start=lambda info: write(step=info["start"], total=info["total"], device=info["device"]),
                on_step=lambda step, total, st: write(step=step, total=total, train_top1=round(st["top1"], 2),
                                                      images_per_s=round(st["images_per_s"], 1)),
                on_eval=lambda row: write(test_top1=row["test_top1"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweep_worker")
    p.add_argument("--progress", type=Path, required=True)
    p.add_argument("--resume", type=Path)
    p.add_argument("recipe_and_overrides", nargs="*")
    a = p.parse_args(argv)

    from ...config import ConfigError, load_config
    from ...errors import Interrupted, TrainingError
    from ...train import Callbacks, RunFolder
    from ...train import train as run_training

    cb = Callbacks(**progress_writer(a.progress))
    try:
        if a.resume is not None:
            cfg = RunFolder(a.resume).load_config()
        else:
            recipe, *overrides = a.recipe_and_overrides
            cfg = load_config(recipe, overrides)
        run_training(cfg, resume=a.resume, callbacks=cb)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except (TrainingError, ConfigError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
