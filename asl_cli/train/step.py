"""One training step, shared by `asl train` and `asl profile train-speed`.

The step keeps its statistics on the device (loss sum, correct count, images, the first step
whose loss was non-finite), so the host never waits for the GPU inside the loop: it reads them
only when it logs, evaluates or saves. On CUDA the whole step (forward, backward, the shifts'
normalised gradient, the optimizer update, the statistics) can be captured once as a CUDA graph
and replayed; the learning rate then lives in device tensors that the scheduler fills in place.

Graphs use `torch.cuda.graph` directly rather than `torch.compile(mode="reduce-overhead")`:
capturing the optimizer step and the gradient hook needs no compilation, starts in
milliseconds and works the same with and without `train.compile` (a compiled model is simply
captured inside the step). The update is `torch.optim.SGD(fused=True)`, which reads a tensor
learning rate on the device and so can be captured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class StepStats:
    """Totals since the last `TrainStep.take_stats()`, read on the host."""

    loss_sum: float
    correct: float
    count: float
    first_bad_step: int | None  # the first step (0-based) whose loss was NaN or inf


def graph_blocker(device: torch.device, world: int, amp: str) -> str | None:
    """Why the whole-step CUDA graph cannot be used with these settings, or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if world > 1:
        return "CUDA graphs are not used under DistributedDataParallel (its all-reduce buckets are rebuilt on the host)"
    if amp == "fp16":
        return "fp16 needs the GradScaler, whose skip-step decision is taken on the host; use train.amp=bf16"
    return None


def lr_to_device(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every group's learning rate a device tensor (schedulers then fill it in place)."""
    for g in opt.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)


def host_lrs(state: dict) -> dict:
    """An optimizer or scheduler state dict with tensor learning rates turned into floats, so a
    checkpoint reads the same whether or not it was written by a graphed run."""
    out = dict(state)
    if "param_groups" in out:
        out["param_groups"] = [{**g, "lr": float(g["lr"])} for g in out["param_groups"]]
    if "_last_lr" in out:
        out["_last_lr"] = [float(v) for v in out["_last_lr"]]
    return out


class TrainStep:
    """Callable as step(x, y): one optimizer step on a batch, statistics accumulated on device.

    With `graph=True` the first `warmup` calls run eagerly on a side stream (they initialise
    the momentum buffers, cuDNN's choices and the allocator), the next call captures the step
    and every later call copies the batch into the graph's static inputs and replays it.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 graph: bool = False, start_step: int = 0, warmup: int = 3):
        self.model, self.opt, self.scaler, self.device = model, opt, scaler, device
        self.amp_dtype, self.channels_last, self.graph = amp_dtype, channels_last, graph
        self.warmup, self.calls = warmup, 0
        z = dict(device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, **z)
        self.correct = torch.zeros((), dtype=torch.float64, **z)
        self.count = torch.zeros((), dtype=torch.float64, **z)
        self.first_bad = torch.full((), -1, dtype=torch.int64, **z)
        self.step_t = torch.full((), start_step, dtype=torch.int64, **z)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[Tensor, Tensor] | None = None
        if graph:
            lr_to_device(opt, device)
        self._side = torch.cuda.Stream(device) if graph else None

    # -- the step itself: device work only, no host reads ----------------------------------
    def _body(self, x: Tensor, y: Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # autocast's weight cache must be off while a graph is captured
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=not self.graph):
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            n = y.shape[0]
            bad = ~torch.isfinite(loss.detach())
            self.loss_sum.add_(torch.where(bad, 0.0, loss.detach().double() * n))
            self.correct.add_((out.detach().argmax(1) == y).sum())
            self.count.add_(n)
            self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.step_t, self.first_bad))
            self.step_t.add_(1)

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.calls += 1
        if not self.graph:
            self.opt.zero_grad(set_to_none=True)
            self._body(x, y)
            return
        if self._graph is None and self.calls <= self.warmup:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self.opt.zero_grad(set_to_none=True)
                self._body(x, y)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return
        if self._graph is None:
            self._capture(x, y)
        sx, sy = self._static
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        self._graph.replay()

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self._static = (x.detach().clone(), y.detach().clone())
        self.opt.zero_grad(set_to_none=True)  # backward inside the graph allocates (and then rewrites) the grads
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body(*self._static)
        self._graph = g

    # -- reading the statistics (a host synchronisation: call at log points) ---------------
    def take_stats(self) -> StepStats:
        vals = torch.stack([self.loss_sum, self.correct, self.count]).tolist()
        bad = int(self.first_bad.item())
        for t in (self.loss_sum, self.correct, self.count):
            t.zero_()
        return StepStats(vals[0], vals[1], vals[2], bad if bad >= 0 else None)

    def peek_bad(self) -> int | None:
        bad = int(self.first_bad.item())
        return bad if bad >= 0 else None
