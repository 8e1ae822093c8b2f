"""How glibc's malloc hands memory back, for CPU training and timing.

By default glibc gives freed memory at the top of the heap back to the system once more than
128 KiB is free there, and serves large requests with mmap, so the tensors that every forward and
backward pass frees and allocates again fault their pages in again on every step (measured: about
10,000 page faults per training step of ASNet-20 at batch 128, 17,000 with depthwise blocks; a
fifth of a training run's wall time went to the kernel). Raising glibc's trim and mmap thresholds
and its top pad (mallopt) keeps that memory for the next step: under 1 fault per step.
"""
from __future__ import annotations

import os

DEFAULT_PAD_MIB = 1024
MAX_PAD_MIB = 2047  # mallopt takes an int of bytes
ENV_KEYS = ("MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def pad_malloc(mib: int) -> str:
    """Have glibc's malloc keep up to `mib` MiB of freed memory at the top of the heap (M_TRIM_THRESHOLD,
    M_TOP_PAD) and serve requests below that size from the heap rather than mmap (M_MMAP_THRESHOLD).
    Affects this process only, and every model in it alike. Returns how allocation is configured
    (for results' `malloc` columns)."""
    import ctypes
    import ctypes.util

    if mib <= 0:
        return "default"
    if mib > MAX_PAD_MIB:
        raise ValueError(f"the malloc pad must be at most {MAX_PAD_MIB} MiB, got {mib}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        size = mib << 20
        # M_TRIM_THRESHOLD (-1), M_TOP_PAD (-2), M_MMAP_THRESHOLD (-3); setting one turns glibc's
        # dynamic thresholds off, so all three are set together.
        ok = all(libc.mallopt(param, size) == 1 for param in (-1, -2, -3))
    except (OSError, AttributeError):
        ok = False
    return f"glibc trim_threshold=top_pad=mmap_threshold={mib}MiB" if ok else "default (mallopt unavailable)"


def configure(setting, device_type: str) -> str:
    """Apply train.malloc_pad_mib and say how allocation is configured. auto: DEFAULT_PAD_MIB on
    the CPU unless the environment already tunes glibc (MALLOC_TOP_PAD_ and the like,
    read when the process started); nothing on a GPU, whose step allocates little host memory;
    0: glibc's default."""
    if setting == "auto":
        from_env = [f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ]
        if from_env:
            return "environment " + " ".join(from_env)
        return pad_malloc(DEFAULT_PAD_MIB) if device_type == "cpu" else "default"
    if isinstance(setting, bool) or not isinstance(setting, int) or not 0 <= setting <= MAX_PAD_MIB:
        raise ValueError(f"train.malloc_pad_mib must be auto or a number of MiB from 0 to {MAX_PAD_MIB}, got {setting!r}")
    return pad_malloc(setting)
