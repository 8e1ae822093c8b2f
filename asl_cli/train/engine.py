"""The training loop: AMP, DDP, evaluation, metrics.csv, atomic checkpoints, exact resume, and
the shift history of every ASL layer. The run's parts come from `builders`, its state and run
folder from `state`. No CLI code: progress is reported through callbacks and failures
through exceptions."""
from __future__ import annotations

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

from . import state as run_folder
from ..errors import Interrupted, NonFiniteLoss, TrainingError
from .builders import (build_data, build_model, build_optimizer, build_schedule, compile_choice, device_kind,
                       pick_device, setup_distributed, shift_lr_mult, total_steps)
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
    (which records the signal); a second one stops at once."""
    lock = RunLock()  # acquired on the run folder once it is known
    undo: list[Callable[[], None]] = []  # what a start that fails must remove
    try:
        return _train(cfg, resume, init_from, callbacks or Callbacks(), lock, undo, stop_signals)
    except BaseException:
        lock.release()
        for f in undo:
            f()
        raise
    finally:
        lock.release()


def _train(cfg: dict, resume, init_from, cb: Callbacks, lock: RunLock, undo: list, stop_signals: tuple) -> dict:
    t = cfg["train"]
    d = setup_distributed(device_kind(t["device"]))
    device = pick_device(t["device"], d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)

    state = None
    if resume is not None:
        run_dir = Path(resume)
        state = run_folder.resume_folder(run_dir, lock if d.main else None)
    else:
        run_dir = run_folder.new_run_dir(cfg)
        if d.world > 1:
            obj = [str(run_dir)]
            dist.broadcast_object_list(obj, src=0)
            run_dir = Path(obj[0])
        if d.main:
            created = not run_dir.exists()
            run_folder.start_folder(run_dir, cfg, lock)
            if created:  # a start that fails (missing data, a wrong device...) leaves no empty run folder behind
                undo.append(lambda: shutil.rmtree(run_dir, ignore_errors=True))

    data = build_data(cfg, d, device)
    total = total_steps(cfg, data.steps_per_epoch)
    model, model_args = build_model(cfg, data.num_classes, d, device, init_from if state is None else None)
    shift_mult = shift_lr_mult(cfg)
    opt = build_optimizer(model, cfg["optim"], device, shift_mult)
    sched = build_schedule(opt, cfg, total)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t["amp"]]
    if amp_dtype is not None and device.type != "cuda":
        raise TrainingError("train.amp needs a CUDA device; use train.amp=none on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    st = TrainState()
    if state is not None:
        st = TrainState.restore(state, model, opt, sched, scaler, device)
        if d.main:
            run_folder.truncate_logs(run_dir, st.step, state.get("last_row"))

    train_model = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled, note = compile_choice(t["compile"], device, d.world, total - st.step)
    if note:
        cb.on_note(note)
    if compiled:
        train_model = torch.compile(train_model)
    graphed = use_cuda_graph(t["cuda_graph"], device, d.world, t["amp"])
    step_fn = TrainStep(train_model, opt, scaler, device, amp_dtype, t["channels_last"], graph=graphed, start_step=st.step)

    def check_finite(step: int) -> None:
        """Raise NonFiniteLoss if any loss since the last check, or the weights, are not finite
        (a host read: called at log, evaluation and checkpoint points only)."""
        bad = step_fn.peek_bad()
        if bad is None and not _weights_finite(model):
            bad = step - 1
        if d.world > 1:
            flag = torch.tensor([float(bad if bad is not None else -1)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = int(flag.item()) if flag.item() >= 0 else None
        if bad is not None:
            raise NonFiniteLoss(bad, run_dir, st.last_good)

    def take_stats() -> None:
        s = step_fn.take_stats()
        vals = [s.loss_sum, s.correct, s.count]
        if d.world > 1:  # log the global batch, not this rank's slice
            v = torch.tensor(vals, dtype=torch.float64, device=device)
            dist.all_reduce(v)
            vals = v.tolist()
        st.acc.loss += vals[0]
        st.acc.correct += vals[1]
        st.acc.count += vals[2]

    def save(row: dict | None, is_best: bool) -> None:
        if d.main:
            run_folder.save(run_dir, st.checkpoint(cfg=cfg, model=model, model_args=model_args, opt=opt, sched=sched, scaler=scaler,
                                                   device=device, total=total, steps_per_epoch=data.steps_per_epoch,
                                                   preprocessing=data.preprocessing, row=row), is_best)

    if state is None and d.main:
        run_folder.append_shifts(run_dir / "shifts.csv", 0, shift_values(model))  # the starting point of every shift

    cb.on_start({"run_dir": str(run_dir), "total": total, "start": st.step, "device": str(device), "world": d.world,
                 "model": cfg["model"]["name"], "steps_per_epoch": data.steps_per_epoch, "train_images": data.n_train, "cuda_graph": graphed,
                 "compiled": compiled, "shift_lr_mult": shift_mult})

    stop = {"flag": False, "signum": None}
    old_handlers = {}

    def request_stop(signum, frame):
        if stop["flag"]:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["flag"], stop["signum"] = True, signum

    if d.main or d.world == 1:
        for sig in stop_signals:
            try:
                old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    undo.clear()  # from here on the folder holds the run's own record
    first_step = st.step
    batches = data.batches_from(st.step)
    interval_start, interval_steps = time.time(), 0
    summary_row: dict | None = None
    # On the CPU reading the statistics costs nothing, so a non-finite loss is caught at once;
    # on a GPU the host reads them only at log, evaluation and checkpoint points.
    check_every = 1 if device.type == "cpu" else t["log_every"]
    train_model.train()
    try:
        for step in range(st.step, total):
            if stop["flag"] or (d.world > 1 and step % t["log_every"] == 0 and _any_rank(stop["flag"], device)):
                check_finite(step)
                take_stats()
                st.step = step
                save(None, False)
                raise Interrupted(step, run_dir, stop["signum"])
            x, y = next(batches)
            t_first = time.time() if compiled and step == first_step else None
            step_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if t_first is not None:
                cb.on_note(f"the first (compiled) step took {time.time() - t_first:.0f} s")
            sched.step()
            interval_steps += 1
            done = st.step = step + 1
            is_log = done % t["log_every"] == 0 or done == total
            is_eval = done % t["eval_every"] == 0 or done == total
            is_ckpt = done % t["ckpt_every"] == 0
            if done % check_every == 0 or is_log or is_eval or is_ckpt:
                check_finite(done)
            if is_log or is_eval or is_ckpt:
                take_stats()
            if is_log:
                el = max(time.time() - interval_start, 1e-9)
                cb.on_step(done, total, {"loss": st.acc.loss / max(st.acc.count, 1), "top1": 100 * st.acc.correct / max(st.acc.count, 1),
                                         "lr": _lr_of(opt), "images_per_s": interval_steps * t["batch_size"] / el})
            if is_eval:
                seconds = time.time() - interval_start
                res = evaluate(unwrap(model), data.test_batches(), device, amp_dtype, t["channels_last"])
                if not all(math.isfinite(v) for v in res.values()):  # never saved, let alone kept as the best
                    raise NonFiniteLoss(done, run_dir, st.last_good, "the evaluation gave a non-finite test loss "
                                        f"({res['test_loss']:.4g}; {res['nonfinite']:.0f} non-finite outputs)")
                train_model.train()
                row = {"step": done, "epoch": round(done / data.steps_per_epoch, 4), "lr": _lr_of(opt),
                       "train_loss": st.acc.loss / max(st.acc.count, 1), "train_top1": 100 * st.acc.correct / max(st.acc.count, 1),
                       **res, "seconds": round(seconds, 3), "images_per_s": round(interval_steps * t["batch_size"] / max(seconds, 1e-9), 1)}
                improved = res["test_top1"] > st.best
                if improved:
                    st.best, st.best_step = res["test_top1"], done
                st.acc = Accum()
                save(row, improved)
                if d.main:
                    run_folder.append_row(run_dir / "metrics.csv", row)
                cb.on_eval(row)
                summary_row, st.last_good = row, done
                interval_start, interval_steps = time.time(), 0
            elif is_ckpt:
                save(None, False)
                st.last_good = done
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    return {"run_dir": str(run_dir), "steps": total, "best_top1": st.best, "last": summary_row, "cuda_graph": graphed, "compiled": compiled}


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


