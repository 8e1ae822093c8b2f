"""`asl profile --layer`: inference time and FLOPs of single layers at the paper's shape
(1x64x224x224, 64 output channels, one CPU thread): paper Table 1 and Fig. 2, plus the ASL row."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ...ops import active_shift
from ...zoo.paper import TABLE1
from .. import figures
from ..bench import median_ms, provenance

LAYERS = {
    "dw3": "3x3 depthwise conv",
    "pw": "1x1 conv",
    "bn": "BatchNorm (inference)",
    "relu": "ReLU",
    "add": "elementwise sum",
    "asl": "active shift",
}


def _layer_fn(name: str, x: torch.Tensor, backward: bool):
    C = x.shape[1]
    g = torch.Generator().manual_seed(0)
    dt, dev = x.dtype, x.device
    w_dw = torch.randn(C, 1, 3, 3, generator=g).to(dev, dt).requires_grad_(backward)
    w_pw = torch.randn(C, C, 1, 1, generator=g).to(dev, dt).requires_grad_(backward)
    mean, var = torch.zeros(C, device=dev, dtype=dt), torch.ones(C, device=dev, dtype=dt)
    gamma, beta = torch.ones(C, device=dev, dtype=dt).requires_grad_(backward), torch.zeros(C, device=dev, dtype=dt).requires_grad_(backward)
    shift = (torch.rand(C, 2, generator=g) * 2 - 1).to(dev).requires_grad_(backward)
    other = torch.randn(x.shape, generator=g).to(dev, dt)
    ops = {
        "dw3": lambda: F.conv2d(x, w_dw, padding=1, groups=C),
        "pw": lambda: F.conv2d(x, w_pw),
        "bn": lambda: F.batch_norm(x, mean, var, gamma, beta, training=False),
        "relu": lambda: torch.relu(x),
        "add": lambda: x + other,
        "asl": lambda: active_shift(x, shift),
    }
    fwd = ops[name]
    # multiply-adds per layer: convs and ASL from FlopCounterMode, one per element for the rest
    elementwise = {"bn": 1, "relu": 1, "add": 1}
    if name in elementwise:
        macs = elementwise[name] * x.numel()
    else:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fwd()
        macs = fc.get_total_flops() // 2
    if not backward:
        def run():
            with torch.no_grad():
                return fwd()
        return run, macs
    leaves = [t for t in (x, w_dw, w_pw, gamma, beta, shift) if t.requires_grad]

    def run_bwd():
        out = fwd()
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    return run_bwd, macs


def run(layers: list[str], shape=(1, 64, 224, 224), device="cpu", threads=1, dtype=torch.float32, backward=False,
        min_run_time=1.0) -> list[dict]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_(backward)
    rows = []
    prov = provenance(device, threads if device == "cpu" else None)
    for name in layers:
        fn, macs = _layer_fn(name, x, backward)
        ms = median_ms(fn, threads=threads, min_run_time=min_run_time)
        paper_ms, paper_mflops = TABLE1.get(name, (None, None))
        rows.append({"layer": name, "description": LAYERS[name], "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                     "pass": "fwd+bwd" if backward else "fwd", "ms": round(ms, 4), "mflops": round(macs / 1e6, 6),
                     "ms_per_mflop": round(ms / max(macs / 1e6, 1e-9), 5), "paper_ms": paper_ms, "paper_mflops": paper_mflops, **prov})
    return rows


def figure(rows: list[dict], stem: Path) -> list[Path]:
    plt = figures.plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["layer"] for r in rows]
    vals = [r["ms_per_mflop"] for r in rows]
    ax.bar(names, vals, color=["tab:red" if n == "asl" else "tab:blue" for n in names])
    ax.set_ylabel("time per MFLOP (ms)")
    ax.set_xlabel("layer")
    r0 = rows[0]
    ax.set_title(f"Time per MFLOP, {r0['shape']} {r0['dtype']} {r0['pass']}\n{r0['device_name']}, {r0['threads']} thread(s)", fontsize=9)
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    return figures.save(fig, stem)
