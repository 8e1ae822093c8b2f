"""Training throughput of a zoo model against the same network with another spatial block
(paper Table 2: ASL trained 1.54x faster than 1B-DW3-B-1), measured in one run."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import install_shift_grad_normalization, param_groups
from ..zoo import create_model, get_entry
from .bench import median_ms, provenance


def step_fn(model, x, y, opt, bf16: bool = False):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def run(model: str = "asnet20_16x1", spatials=("asl", "dw3_bn", "dw3"), batch: int = 128, device: str = "cpu",
        threads: int | None = None, amp: bool = False, channels_last: bool = False, min_run_time: float = 2.0) -> list[dict]:
    entry = get_entry(model)
    prov = provenance(device, threads if device == "cpu" else None)
    rows = []
    for spatial in spatials:
        torch.manual_seed(0)
        m = create_model(model, spatial=spatial).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        m = m.to(memory_format=fmt)
        x = torch.randn(batch, 3, entry.input_size, entry.input_size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        opt = torch.optim.SGD(param_groups(m, 0.01, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
        install_shift_grad_normalization(opt)
        bf16 = amp and device.startswith("cuda")
        ms = median_ms(step_fn(m, x, y, opt, bf16), threads=threads or torch.get_num_threads(), min_run_time=min_run_time)
        rows.append({"model": model, "spatial": spatial, "batch": batch, "ms_per_step": round(ms, 3),
                     "images_per_s": round(batch / ms * 1e3, 1), "amp": "bf16" if bf16 else "none",
                     "channels_last": channels_last, **prov})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_of_first"] = round(base / r["images_per_s"], 3)
    return rows
