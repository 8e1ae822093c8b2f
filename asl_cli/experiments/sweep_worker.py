"""One run of a sweep in its own process: `python -m asl_cli.experiments.sweep_worker --progress
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


def progress_writer(path: Path) -> dict:
    """Training callbacks (engine.Callbacks' keyword arguments) that keep `path` a JSON record of
    the run's progress, replaced atomically, for the sweep's live view and `--status`."""
    state = {"step": 0, "total": None, "t0": time.time()}

    def write(**kw):
        state.update(kw)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in state.items() if k != "t0"} | {"elapsed_s": round(time.time() - state["t0"], 1)}))
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

    from ..config import ConfigError, load_config
    from ..errors import Interrupted, TrainingError
    from ..train import Callbacks
    from ..train import train as run_training

    cb = Callbacks(**progress_writer(a.progress))
    try:
        if a.resume is not None:
            cfg = load_config(str(a.resume / "config.yaml"))
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
