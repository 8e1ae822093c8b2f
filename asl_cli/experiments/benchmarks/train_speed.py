"""Training throughput of a zoo model against the same network with another spatial block
(paper Table 2: ASL trained 1.54x faster than 1B-DW3-B-1), measured in one run.

Each configuration runs the step code of `asl train` (`asl_cli.step.TrainStep`: the same
optimizer, scheduler, on-device batches with augmentation, device-side statistics and, in mode
`graph`, the captured CUDA graph), so the figures are what training gets. On a GPU it also
reports the fraction of the step's wall time in which the GPU runs a kernel.
"""
from __future__ import annotations

import torch

from ...nn import fuse_bn_relu
from ...config import DEFAULTS
from ...data import TensorBatches
from ...train.optim import build_optimizer
from ...train.step import TrainStep
from ...zoo import create_model, get_entry
from ..bench import median_ms, provenance

MODES = ("eager", "graph", "compile", "compile+graph")


def make_step(model_name: str, spatial: str, batch: int, device: torch.device, mode: str = "eager",
              amp: str = "none", channels_last: bool = False, fused_bn_relu: bool = False):
    """A zero-argument callable that runs one training step exactly as `asl train` would."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    entry = get_entry(model_name)
    torch.manual_seed(0)
    model = create_model(model_name, spatial=spatial)
    if fused_bn_relu:
        fuse_bn_relu(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, DEFAULTS["optim"], device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp_dtype = {"none": None, "bf16": torch.bfloat16}[amp]
    train_model = torch.compile(model) if mode.startswith("compile") else model
    step = TrainStep(train_model, opt, scaler, device, amp_dtype, channels_last, graph=mode.endswith("graph"))
    size = entry.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (max(8 * batch, 1024), 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (len(x),), generator=g)
    data = TensorBatches(x, y, batch, (0.5,) * 3, (0.25,) * 3, True, 0, device)
    k = [0]
    model.train()

    def one():
        xb, yb = data.batch(k[0])
        step(xb, yb)
        sched.step()
        k[0] += 1

    return one


def train_macs(model_name: str, spatial: str) -> int:
    """Multiply-accumulates of one training image: forward and backward (FlopCounterMode, the
    active shift's own formulas for its forward and its two gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    entry = get_entry(model_name)
    model = create_model(model_name, spatial=spatial).train()
    x = torch.randn(2, 3, entry.input_size, entry.input_size)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    return fc.get_total_flops() // 2 // 2


def gpu_busy_fraction(fn, steps: int = 20) -> float | None:
    """Share of the wall time between the first and the last kernel of `steps` steps in which
    some kernel runs (torch.profiler's CUDA activity); None when no kernel was recorded."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return None
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + (cur_e - cur_s), s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / max(spans[-1][1] - spans[0][0], 1e-9)


def page_faults_per_step(fn, steps: int = 3) -> float:
    """Minor page faults of this process per step: pages the allocator handed back to the system
    and the next step touched again (see asl_cli.allocator)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def run(model: str = "asnet20_16x1", spatials=("asl", "dw3_bn", "dw3"), batch: int = 128, device: str = "cpu",
        threads: int | None = None, amp: str = "none", layouts=("nchw",), modes=("eager",), bn_relus=("aten",),
        min_run_time: float = 1.0, rounds: int = 5, progress=lambda text: None) -> list[dict]:
    """Every (mode, layout, BatchNorm-ReLU, block) step is built and warmed up first, then timed for `min_run_time` seconds
    in each of `rounds` rounds that visit each in turn, and its figure is the median over the rounds: a machine whose speed drifts
    over minutes moves every configuration alike, so the ratios between them hold."""
    import statistics

    from .profile_models import blas_gmacs

    dev = torch.device(device)
    nthreads = threads or torch.get_num_threads()
    if any(m.startswith("compile") for m in modes):
        # every compiled configuration is one more compilation of the same forward code; past
        # dynamo's limit (8) the rest would silently run eager
        from torch import _dynamo

        n_compiled = sum(m.startswith("compile") for m in modes) * len(layouts) * len(bn_relus) * len(spatials)
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, n_compiled + 1)
    prov = provenance(device, threads if dev.type == "cpu" else None)
    macs = {s: train_macs(model, s) for s in spatials}
    steps, times = {}, {}
    for mode in modes:
        for layout in layouts:
            for bn in bn_relus:
                for spatial in spatials:
                    progress(f"{model} {spatial} {mode} {layout} {bn}: building and warming up")
                    fn = make_step(model, spatial, batch, dev, mode, amp, layout == "channels_last", bn == "fused")
                    for _ in range(6):  # eager warm-up steps, capture, compilation
                        fn()
                    steps[mode, layout, bn, spatial], times[mode, layout, bn, spatial] = fn, []
    for r in range(rounds):
        for key, fn in steps.items():
            progress(f"round {r + 1}/{rounds}: {model} {key[3]} {', '.join(key[:3])}")
            times[key].append(median_ms(fn, threads=nthreads, min_run_time=min_run_time, warmup=1))
    peak = blas_gmacs(nthreads) if dev.type == "cpu" else None  # the same run's practical peak
    rows = []
    for (mode, layout, bn, spatial), fn in steps.items():
        ms = statistics.median(times[mode, layout, bn, spatial])
        busy = gpu_busy_fraction(fn) if dev.type == "cuda" else None
        faults = page_faults_per_step(fn) if dev.type == "cpu" else None
        gmacs = batch / ms * 1e3 * macs[spatial] / 1e9
        rows.append({"model": model, "spatial": spatial, "mode": mode, "batch": batch, "ms_per_step": round(ms, 3),
                     "ms_per_step_rounds": ";".join(f"{t:.1f}" for t in times[mode, layout, bn, spatial]), "rounds": rounds,
                     "images_per_s": round(batch / ms * 1e3, 1), "gpu_busy": None if busy is None else round(busy, 3),
                     "train_macs_per_image": macs[spatial], "gmacs_per_s": round(gmacs, 2),
                     "matmul_gmacs_per_s": None if peak is None else round(peak, 2),
                     "fraction_of_matmul_peak": None if peak is None else round(gmacs / peak, 4),
                     "page_faults_per_step": None if faults is None else round(faults, 1),
                     "amp": amp, "channels_last": layout == "channels_last", "fused_bn_relu": bn == "fused", **prov})
    for r in rows:  # ASL's speed relative to each block, within the same mode, layout and BatchNorm-ReLU
        asl = next((q for q in rows if q["mode"] == r["mode"] and q["channels_last"] == r["channels_last"]
                    and q["fused_bn_relu"] == r["fused_bn_relu"] and q["spatial"] == spatials[0]), r)
        r["speedup_of_first"] = round(asl["images_per_s"] / r["images_per_s"], 3)
    return rows


def layout_of(row: dict) -> str:
    """A timed step's memory layout: "nchw" or "channels_last"."""
    return "channels_last" if row["channels_last"] else "nchw"


def form(row: dict) -> str:
    """A timed step's mode, memory layout and BatchNorm-ReLU, e.g. "eager, channels_last, fused"."""
    return f"{row['mode']}, {layout_of(row)}" + (", fused" if row.get("fused_bn_relu") else "")


def speedups(rows: list[dict]) -> list[dict]:
    """The first block's fastest step against each other block's fastest step and its eager step
    (images/s ratios). The peer's eager step is its plain PyTorch one: eager in NCHW with ATen's
    BatchNorm and ReLU when timed, else the nearest eager step timed; vs_eager is None when no
    eager step was timed."""
    first = rows[0]["spatial"]
    best = max((r for r in rows if r["spatial"] == first), key=lambda r: r["images_per_s"])
    out = []
    for peer in dict.fromkeys(r["spatial"] for r in rows if r["spatial"] != first):
        o = [r for r in rows if r["spatial"] == peer]
        eagers = sorted((r for r in o if r["mode"] == "eager"), key=lambda r: (r["channels_last"], bool(r.get("fused_bn_relu"))))
        eager = eagers[0] if eagers else None
        fastest = max(o, key=lambda r: r["images_per_s"])
        out.append({"block": first, "mode": form(best), "peer": peer, "peer_mode": form(fastest),
                    "eager_mode": None if eager is None else form(eager),
                    "vs_fastest": best["images_per_s"] / fastest["images_per_s"],
                    "vs_eager": None if eager is None else best["images_per_s"] / eager["images_per_s"]})
    return out

