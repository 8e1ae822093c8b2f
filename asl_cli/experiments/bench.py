"""Timing and provenance helpers shared by the benchmarks: torch.utils.benchmark medians and the
columns that say how a number was obtained."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.utils.benchmark as tbench  # its cpp_extension warning is silenced in asl_cli/__init__

REPO = Path(__file__).resolve().parents[2]  # the source checkout, for the commit id only


def results_dir() -> Path:
    """Where commands write their CSVs and figures by default: results/ under the working directory."""
    return Path("results")


def median_ms(fn: Callable[[], object], threads: int = 1, min_run_time: float = 1.0, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (CUDA work is synchronised by the timer)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # warm up with the thread count that is timed (oneDNN caches per setting)
    try:
        for _ in range(warmup):
            fn()
    finally:
        torch.set_num_threads(prev)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def model_latency(model: torch.nn.Module, input_size: int, device: str, threads: int = 1,
                  min_run_time: float = 0.5, copy_model: bool = True) -> dict:
    """Inference latency of (a copy of) the model: CPU batch 1 on `threads` threads (ms); on a GPU
    also batch 1 (ms) and batch-256 throughput (images/s)."""
    import copy

    model = copy.deepcopy(model).eval() if copy_model else model
    out = {}
    x = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        out["cpu_ms_batch1"] = round(median_ms(lambda: model(x), threads=threads, min_run_time=min_run_time), 3)
        if device.startswith("cuda") and torch.cuda.is_available() and not isinstance(model, torch.jit.ScriptModule):
            m = copy.deepcopy(model).to(device)
            x1 = x.to(device)
            out["gpu_ms_batch1"] = round(median_ms(lambda: m(x1), min_run_time=min_run_time), 3)
            # throughput as deployed on a GPU: bfloat16 weights and activations, channels_last
            mb = gpu_bf16_channels_last(m)
            xb = torch.randn(256, 3, input_size, input_size, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            out["gpu_images_per_s_batch256"] = round(256e3 / median_ms(lambda: mb(xb), min_run_time=min_run_time), 1)
    return out


def gpu_bf16_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """bfloat16 weights and channels_last; the active shifts stay float32 (their fractions need
    the precision, and the operator takes a float32 shift with a bfloat16 input)."""
    m = model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    for mod in m.modules():
        t = getattr(mod, "shift", None)
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 2:
            t.data = t.data.float()
    return m


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        # the benchmarks' own outputs in results/ do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    proc = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                proc = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{proc} ({os.cpu_count()} cores)"


def provenance(device: str, threads: int | None) -> dict:
    """Columns that say how a measured number can be reproduced."""
    return {
        "device": device,
        "device_name": device_name(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["asl"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("asl", "__main__.py") else " ".join(sys.argv),
    }


def append_csv(rows: list[dict], path: Path) -> Path:
    """Append rows to a CSV (header written once; new columns extend it)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    if path.exists() and path.stat().st_size > 0:
        # earlier rows are kept as text: a commit hash such as 12363e220724 must not turn into a float
        df = pd.concat([pd.read_csv(path, dtype=str, keep_default_na=False), df], ignore_index=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path
