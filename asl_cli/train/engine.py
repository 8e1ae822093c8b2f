"""The training loop: AMP, DDP, evaluation, metrics.csv, atomic checkpoints, exact resume, and
the shift history of every ASL layer. The run's parts come from `distributed`, `model_setup`,
`optim` and `data.streams`, its state from `state`, its files from `run_folder`. No CLI code:
progress is reported through callbacks and failures through exceptions."""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import state as run_state
from ..allocator import configure as configure_malloc
from ..nn import BatchNormReLU2d
from ..errors import Interrupted, NonFiniteLoss, TrainingError
from ..data.streams import build_data
from .distributed import device_kind, pick_device, setup_distributed
from .model_setup import build_model, compile_choice, use_channels_last
from .optim import build_optimizer, build_schedule, shift_lr_mult, total_steps
from .run_folder import RunFolder
from .run_lock import RunLock
from .state import Accum, TrainState, shift_values, unwrap
from .step import TrainStep, graph_blocker


@dataclass
class Callbacks:
    on_start: Callable[[dict], None] = lambda info: None
    on_step: Callable[[int, int, dict], None] = lambda step, total, stats: None
    on_eval: Callable[[dict], None] = lambda row: None
    on_note: Callable[[str], None] = lambda text: None


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator, device: torch.device, amp_dtype=None, channels_last=False) -> dict:
    """Test loss, top-1 and top-5; sums stay on the device until the last batch."""
    model.eval()
    sums, n = torch.zeros(4, dtype=torch.float64, device=device), 0  # loss, top1, top5, non-finite outputs; images
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), (pred[:, 0] == y).sum().double(),
                             (pred == y[:, None]).any(dim=1).sum().double(), (~torch.isfinite(out)).any(dim=1).sum().double()])
        n += len(y)
    loss, top1, top5, nonfinite = sums.tolist()
    n = max(n, 1)
    return {"test_loss": loss / n, "test_top1": 100.0 * top1 / n, "test_top5": 100.0 * top5 / n, "nonfinite": nonfinite}


def use_cuda_graph(setting, device: torch.device, world: int, amp: str) -> bool:
    """Resolve train.cuda_graph (auto | true | false) for this run."""
    blocker = graph_blocker(device, world, amp)
    if setting == "auto":
        return blocker is None
    if setting and blocker is not None:
        raise TrainingError(f"train.cuda_graph=true: {blocker}; set train.cuda_graph=auto or false")
    return bool(setting)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def train(cfg: dict, resume: str | Path | None = None, init_from: str | Path | None = None,
          callbacks: Callbacks | None = None, stop_signals: tuple = STOP_SIGNALS) -> dict:
    """Trains per the resolved recipe `cfg`; returns a summary dict. Resuming reads the run
    folder's config.yaml and checkpoints/last.pt. The run folder is locked for the run's life.
    Any of `stop_signals` makes the run save a checkpoint at the next step and raise Interrupted
    (which records the signal); a second Ctrl-C stops at once."""
    lock = RunLock()  # acquired on the run folder once it is known
    undo: list[Callable[[], None]] = []  # what a start that fails must remove
    try:
        run = _Run(cfg, callbacks or Callbacks())
        state = run.open_folder(resume, lock, undo)  # set-up: the run folder
        run.build(init_from if state is None else None)  # set-up: data, model, optimizer
        run.restore(state)  # resume
        run.prepare_step()  # set-up: DDP, compilation, CUDA graph
        with _stop_requests(stop_signals, run.dist) as stop:
            undo.clear()  # from here on the folder holds the run's own record
            run.loop(stop)  # the step loop, with its evaluation and checkpoint points
        return run.summary()  # shutdown
    except BaseException:
        lock.release()
        for f in undo:
            f()
        raise
    finally:
        lock.release()


class _Run:
    """One training run's parts and progress; each method is one phase of `train`."""

    def __init__(self, cfg: dict, cb: Callbacks):
        self.cfg, self.train_cfg, self.cb = cfg, cfg["train"], cb
        self.dist = setup_distributed(device_kind(self.train_cfg["device"]))
        self.device = pick_device(self.train_cfg["device"], self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.train_cfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
        self.state = TrainState()
        self.summary_row: dict | None = None

    def open_folder(self, resume, lock: RunLock, undo: list) -> dict | None:
        """Creates (or, resuming, reopens) the run folder and locks it; returns the checkpoint to
        resume from, if any."""
        d = self.dist
        if resume is not None:
            self.folder = RunFolder(resume)
            self.run_dir = self.folder.path
            state = run_state.resume(self.folder, lock if d.main else None)
            if d.main:  # paths or logging given anew (the caller checked that training is unchanged)
                self.folder.write_config(self.cfg)
            return state
        folder = RunFolder.new(self.cfg)
        if d.world > 1:
            obj = [str(folder.path)]
            dist.broadcast_object_list(obj, src=0)
            folder = RunFolder(obj[0])
        if d.main:
            created = not folder.path.exists()
            folder.start(self.cfg, lock)
            if created:  # a start that fails (missing data, a wrong device...) leaves no empty run folder behind
                undo.append(lambda: shutil.rmtree(folder.path, ignore_errors=True))
        self.folder, self.run_dir = folder, folder.path
        return None

    def build(self, init_from) -> None:
        cfg, t, device = self.cfg, self.train_cfg, self.device
        self.data = build_data(cfg, self.dist.rank, self.dist.world, device)
        self.total = total_steps(cfg, self.data.steps_per_epoch)
        self.model, self.model_args = build_model(cfg, self.data.num_classes, self.dist, device, init_from)
        self.shift_mult = shift_lr_mult(cfg)
        self.opt = build_optimizer(self.model, cfg["optim"], device, self.shift_mult)
        self.sched = build_schedule(self.opt, cfg, self.total)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t["amp"]]
        if self.amp_dtype is not None and device.type != "cuda":
            raise TrainingError("train.amp needs a CUDA device; use train.amp=none on the CPU")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def restore(self, state: dict | None) -> None:
        """Resume: the step, weights, optimizer, schedule and logs of the checkpoint; a new run
        records every shift's starting point instead."""
        if state is not None:
            self.state = TrainState.restore(state, self.model, self.opt, self.sched, self.scaler, self.device)
            if self.dist.main:
                self.folder.truncate_logs(self.state.step, state.get("last_row"))
        elif self.dist.main:
            self.folder.append_shifts(0, shift_values(self.model))

    def prepare_step(self) -> None:
        t, d, device = self.train_cfg, self.dist, self.device
        self.train_model = self.model
        if d.world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.malloc = configure_malloc(t["malloc_pad_mib"], device.type)
        self.channels_last = use_channels_last(t["channels_last"], device)
        self.fused_bn_relu = sum(isinstance(m, BatchNormReLU2d) for m in self.model.modules())
        self.compiled, note = compile_choice(t["compile"], device, d.world, self.total - self.state.step)
        if note:
            self.cb.on_note(note)
        if self.compiled:
            self.train_model = torch.compile(self.train_model)
        self.graphed = use_cuda_graph(t["cuda_graph"], device, d.world, t["amp"])
        self.step_fn = TrainStep(self.train_model, self.opt, self.scaler, device, self.amp_dtype, self.channels_last,
                                 graph=self.graphed, start_step=self.state.step)
        self.cb.on_start({"run_dir": str(self.run_dir), "total": self.total, "start": self.state.step, "device": str(device),
                          "world": d.world, "model": self.cfg["model"]["name"], "steps_per_epoch": self.data.steps_per_epoch,
                          "train_images": self.data.n_train, "cuda_graph": self.graphed, "compiled": self.compiled,
                          "malloc": self.malloc, "channels_last": self.channels_last, "fused_bn_relu": self.fused_bn_relu,
                          "shift_lr_mult": self.shift_mult})

    def loop(self, stop: dict) -> None:
        t, st, total = self.train_cfg, self.state, self.total
        first_step = st.step
        batches = self.data.batches_from(st.step)
        self.interval_start, self.interval_steps = time.time(), 0
        # On the CPU reading the statistics costs nothing, so a non-finite loss is caught at once;
        # on a GPU the host reads them only at log, evaluation and checkpoint points.
        check_every = 1 if self.device.type == "cpu" else t["log_every"]
        self.train_model.train()
        for step in range(st.step, total):
            if stop["flag"] or (self.dist.world > 1 and step % t["log_every"] == 0 and _any_rank(stop["flag"], self.device)):
                self.stop_at(step, stop["signum"])
            x, y = next(batches)
            t_first = time.time() if self.compiled and step == first_step else None
            self.step_fn(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            if t_first is not None:
                self.cb.on_note(f"the first (compiled) step took {time.time() - t_first:.0f} s")
            self.sched.step()
            self.interval_steps += 1
            done = st.step = step + 1
            is_log = done % t["log_every"] == 0 or done == total
            is_eval = done % t["eval_every"] == 0 or done == total
            is_ckpt = done % t["ckpt_every"] == 0
            if done % check_every == 0 or is_log or is_eval or is_ckpt:
                self.check_finite(done)
            if is_log or is_eval or is_ckpt:
                self.take_stats()
            if is_log:
                self.log(done)
            if is_eval:
                self.eval_point(done)
            elif is_ckpt:
                self.save(None, False)
                st.last_good = done

    def stop_at(self, step: int, signum) -> None:
        """A stop request: checkpoint the step reached, then raise Interrupted."""
        self.check_finite(step)
        self.take_stats()
        self.state.step = step
        self.save(None, False)
        raise Interrupted(step, self.run_dir, signum)

    def log(self, done: int) -> None:
        acc = self.state.acc
        el = max(time.time() - self.interval_start, 1e-9)
        self.cb.on_step(done, self.total, {"loss": acc.loss / max(acc.count, 1), "top1": 100 * acc.correct / max(acc.count, 1),
                                           "lr": _lr_of(self.opt), "images_per_s": self.interval_steps * self.train_cfg["batch_size"] / el})

    def eval_point(self, done: int) -> None:
        """An evaluation point: test metrics, a checkpoint (the best one too when it improved) and
        a metrics.csv row."""
        st, t = self.state, self.train_cfg
        seconds = time.time() - self.interval_start
        res = evaluate(unwrap(self.model), self.data.test_batches(), self.device, self.amp_dtype, self.channels_last)
        if not all(math.isfinite(v) for v in res.values()):  # never saved, let alone kept as the best
            raise NonFiniteLoss(done, self.run_dir, st.last_good, "the evaluation gave a non-finite test loss "
                                f"({res['test_loss']:.4g}; {res['nonfinite']:.0f} non-finite outputs)")
        self.train_model.train()
        row = {"step": done, "epoch": round(done / self.data.steps_per_epoch, 4), "lr": _lr_of(self.opt),
               "train_loss": st.acc.loss / max(st.acc.count, 1), "train_top1": 100 * st.acc.correct / max(st.acc.count, 1),
               **res, "seconds": round(seconds, 3),
               "images_per_s": round(self.interval_steps * t["batch_size"] / max(seconds, 1e-9), 1)}
        improved = res["test_top1"] > st.best
        if improved:
            st.best, st.best_step = res["test_top1"], done
        st.acc = Accum()
        self.save(row, improved)
        if self.dist.main:
            self.folder.append_metrics(row)
        self.cb.on_eval(row)
        self.summary_row, st.last_good = row, done
        self.interval_start, self.interval_steps = time.time(), 0

    def check_finite(self, step: int) -> None:
        """Raise NonFiniteLoss if any loss since the last check, or the weights, are not finite
        (a host read: the loop calls it every step on the CPU, at its log, evaluation and
        checkpoint points on a GPU)."""
        bad = self.step_fn.peek_bad()
        if bad is None and not _weights_finite(self.model):
            bad = step - 1
        if self.dist.world > 1:
            flag = torch.tensor([float(bad if bad is not None else -1)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = int(flag.item()) if flag.item() >= 0 else None
        if bad is not None:
            raise NonFiniteLoss(bad, self.run_dir, self.state.last_good)

    def take_stats(self) -> None:
        s = self.step_fn.take_stats()
        vals = [s.loss_sum, s.correct, s.count]
        if self.dist.world > 1:  # log the global batch, not this rank's slice
            v = torch.tensor(vals, dtype=torch.float64, device=self.device)
            dist.all_reduce(v)
            vals = v.tolist()
        self.state.acc.loss += vals[0]
        self.state.acc.correct += vals[1]
        self.state.acc.count += vals[2]

    def save(self, row: dict | None, is_best: bool) -> None:
        if self.dist.main:
            run_state.save(self.folder, self.state.checkpoint(
                cfg=self.cfg, model=self.model, model_args=self.model_args, opt=self.opt, sched=self.sched,
                scaler=self.scaler, device=self.device, total=self.total, steps_per_epoch=self.data.steps_per_epoch,
                preprocessing=self.data.preprocessing, row=row), is_best)

    def summary(self) -> dict:
        return {"run_dir": str(self.run_dir), "steps": self.total, "best_top1": self.state.best, "last": self.summary_row,
                "cuda_graph": self.graphed, "compiled": self.compiled, "channels_last": self.channels_last,
                "fused_bn_relu": self.fused_bn_relu,
                "malloc": self.malloc}


@contextlib.contextmanager
def _stop_requests(signals: tuple, d):
    """While the loop runs, each of `signals` asks it to stop at the next step, and the first one
    is recorded; a second SIGINT (Ctrl-C twice) stops at once. Any other signal after the first
    only repeats the request: a scheduler sends several together (Slurm's preemption: USR2 then
    SIGTERM to every process of the job) and the checkpoint must still be written before its
    SIGKILL. The previous handlers come back afterwards."""
    stop = {"flag": False, "signum": None}
    old_handlers = {}

    def request_stop(signum, frame):
        if stop["flag"]:
            if signum == signal.SIGINT == stop["signum"]:  # Ctrl-C twice: stop now
                raise KeyboardInterrupt
            return
        stop["flag"], stop["signum"] = True, signum

    if d.main or d.world == 1:
        for sig in signals:
            try:
                old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
    try:
        yield stop
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)


def _lr_of(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[-1]["lr"])


def _weights_finite(model: nn.Module) -> bool:
    # parameters and buffers: BatchNorm's running statistics can overflow before any weight does
    flags = [torch.isfinite(v).all() for v in unwrap(model).state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


