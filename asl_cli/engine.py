"""The training loop: optimizer and schedule, AMP, DDP, evaluation, metrics.csv, atomic
checkpoints, exact resume, and the shift history of every ASL layer. No CLI code: progress is
reported through callbacks and failures through exceptions."""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_io
from .config import dump
from .data import IMAGENET_MEAN, IMAGENET_STD, TensorBatches, imagenet_folders, load_tensor_data, steps_per_epoch
from .run_lock import RunFolderBusy, RunLock, remove_stale_temps
from .nn import install_shift_grad_normalization, param_groups, shift_layers
from .step import TrainStep, graph_blocker, host_lrs
from .zoo import create_model

METRIC_COLUMNS = ["step", "epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds", "images_per_s"]


class TrainingError(RuntimeError):
    pass


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, run_dir: Path, last_good: int | None):
        self.step, self.run_dir, self.last_good = step, run_dir, last_good
        kept = f"the last good checkpoint (step {last_good}) is kept" if last_good is not None else "no checkpoint had been written yet"
        super().__init__(f"the loss became non-finite at step {step}; training stopped and {kept} in {run_dir}")


class Interrupted(TrainingError):
    def __init__(self, step: int, run_dir: Path):
        self.step, self.run_dir = step, run_dir
        super().__init__(f"interrupted; a checkpoint at step {step} was saved in {run_dir}")


@dataclass
class Callbacks:
    on_start: Callable[[dict], None] = lambda info: None
    on_step: Callable[[int, int, dict], None] = lambda step, total, stats: None
    on_eval: Callable[[dict], None] = lambda row: None


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(world, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(spec: str, d: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("train.device asks for CUDA but no GPU is visible; use train.device=cpu")
        return torch.device("cuda", d.local_rank) if spec == "cuda" else torch.device(spec)
    if spec != "cpu":
        raise TrainingError(f"train.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return torch.device("cpu")


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across processes (CPU
    processes under gloo; nn.SyncBatchNorm covers CUDA). Differentiable through the all-reduce."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.shape[1]
        xf = x.float()
        n_local = xf.numel() // C
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), xf.new_tensor([n_local])])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
                self.num_batches_tracked += 1
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_allreduce_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_allreduce_bn(child)
    return module


def lr_factor(cfg: dict, total: int) -> Callable[[int], float]:
    s = cfg["schedule"]
    kind, warm = s["type"], int(s["warmup"])
    milestones = sorted(int(m) for m in s["milestones"])

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if kind == "multistep":
            return w * s["gamma"] ** sum(step >= m for m in milestones)
        if kind == "linear":
            return w * max(0.0, 1 - step / total)
        if kind == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return w

    return f


def new_run_dir(cfg: dict) -> Path:
    if cfg["output"]["dir"]:
        return Path(cfg["output"]["dir"])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg["output"]["runs_root"]) / f"{stamp}-{cfg['name']}-{cfg['model']['name']}"
    p, i = base, 2
    while p.exists():
        p, i = Path(f"{base}-{i}"), i + 1
    return p


def unwrap(model: nn.Module) -> nn.Module:
    m = model.module if hasattr(model, "module") else model
    return getattr(m, "_orig_mod", m)


def clean_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def shift_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.shift.detach().float().cpu().clone() for name, layer in shift_layers(unwrap(model))}


@dataclass
class Accum:
    """Running training loss / accuracy since the last evaluation (float64 for exact resume)."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def state(self) -> dict:
        return dict(loss=self.loss, correct=self.correct, count=self.count)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator, device: torch.device, amp_dtype=None, channels_last=False) -> dict:
    """Test loss, top-1 and top-5; sums stay on the device until the last batch."""
    model.eval()
    sums, n = torch.zeros(3, dtype=torch.float64, device=device), 0  # loss, top1, top5; images
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
                             (pred == y[:, None]).any(dim=1).sum().double()])
        n += len(y)
    loss, top1, top5 = sums.tolist()
    n = max(n, 1)
    return {"test_loss": loss / n, "test_top1": 100.0 * top1 / n, "test_top5": 100.0 * top5 / n}


class FolderStream:
    """ImageFolder batches from a given global step on (DistributedSampler-style sharding)."""

    def __init__(self, dataset, batch_size: int, seed: int, d: Dist, workers: int):
        if batch_size % d.world:
            raise TrainingError(f"train.batch_size={batch_size} must be divisible by the number of processes ({d.world})")
        self.ds, self.batch_size, self.seed, self.d, self.workers = dataset, batch_size, seed, d, workers
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size)

    def iterate(self, start: int):
        from torch.utils.data import DataLoader, Subset

        local = self.batch_size // self.d.world
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.ds), generator=g)[: self.steps_per_epoch * self.batch_size]
            mine = perm.view(self.steps_per_epoch, self.d.world, local)[skip:, self.d.rank].reshape(-1).tolist()
            loader = DataLoader(Subset(self.ds, mine), batch_size=local, shuffle=False, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available(), persistent_workers=False)
            yield from loader
            epoch, skip = epoch + 1, 0


def build_optimizer(model: nn.Module, o: dict, device: torch.device) -> torch.optim.SGD:
    """SGD with the paper's parameter groups and the shifts' normalised gradient. On CUDA the fused
    update, which takes its learning rate as a device tensor (what a captured step needs)."""
    groups = param_groups(model, o["lr"], o["weight_decay"], o["shift_lr_mult"], o["normalize_shift_grad"])
    opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"] and o["momentum"] > 0,
                          fused=True if device.type == "cuda" else None)
    install_shift_grad_normalization(opt)
    return opt


def use_cuda_graph(setting, device: torch.device, world: int, amp: str) -> bool:
    """Resolve train.cuda_graph (auto | true | false) for this run."""
    blocker = graph_blocker(device, world, amp)
    if setting == "auto":
        return blocker is None
    if setting and blocker is not None:
        raise TrainingError(f"train.cuda_graph=true: {blocker}; set train.cuda_graph=auto or false")
    return bool(setting)


RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "accum", "step", "best_top1")


def train(cfg: dict, resume: str | Path | None = None, init_from: str | Path | None = None,
          callbacks: Callbacks | None = None) -> dict:
    """Trains per the resolved recipe `cfg`; returns a summary dict. Resuming reads the run
    folder's config.yaml and checkpoints/last.pt. The run folder is locked for the run's life."""
    lock = RunLock(Path("."))  # replaced by the run folder's lock once it is known
    try:
        return _train(cfg, resume, init_from, callbacks or Callbacks(), lock)
    finally:
        lock.release()


def _own(lock: RunLock, run_dir: Path) -> None:
    lock.path = run_dir / ".lock"
    try:
        lock.acquire()
    except RunFolderBusy as e:
        raise TrainingError(str(e)) from None
    remove_stale_temps(run_dir)


def _repair_best(run_dir: Path, state: dict) -> None:
    """A kill while best.pt was being written leaves the previous best.pt; last.pt of the same
    step holds the same state, so best.pt is restored from it."""
    if state.get("best_step") != state["step"]:
        return
    best = run_dir / "checkpoints" / "best.pt"
    try:
        if ckpt_io.load(best)["step"] == state["step"]:
            return
    except ckpt_io.CheckpointError:
        pass
    tmp = best.with_name(f".best.pt.tmp-{os.getpid()}")
    shutil.copyfile(state["_path"], tmp)
    os.replace(tmp, best)


def _train(cfg: dict, resume, init_from, cb: Callbacks, lock: RunLock) -> dict:
    t = cfg["train"]
    device_kind = "cuda" if (t["device"].startswith("cuda") or (t["device"] == "auto" and torch.cuda.is_available())) else "cpu"
    d = setup_distributed(device_kind)
    device = pick_device(t["device"], d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)

    state = None
    if resume is not None:
        run_dir = Path(resume)
        if d.main:
            _own(lock, run_dir)
        state = ckpt_io.load(run_dir, prefer="last")
        lacking = [k for k in RESUME_KEYS if k not in state]
        if lacking:
            raise TrainingError(f"{state['_path']} holds weights but no training state ({', '.join(lacking)}), so the run cannot "
                                f"be resumed from it; start a new run with --init-from {state['_path']}")
        if d.main:
            _repair_best(run_dir, state)
    else:
        run_dir = new_run_dir(cfg)
        if d.world > 1:
            obj = [str(run_dir)]
            dist.broadcast_object_list(obj, src=0)
            run_dir = Path(obj[0])
        if d.main:
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise TrainingError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another output.dir")
            _own(lock, run_dir)
            if (run_dir / "checkpoints" / "last.pt").exists():  # another process got there first
                raise TrainingError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another output.dir")
            leftovers = [f for f in ("metrics.csv", "shifts.csv") if (run_dir / f).exists()]
            if leftovers:  # an earlier run here stopped before its first checkpoint: its logs cannot be continued
                warnings.warn(f"{run_dir}: removing {', '.join(leftovers)} of an earlier run that saved no checkpoint", stacklevel=2)
                for f in leftovers:
                    (run_dir / f).unlink()
            (run_dir / "config.yaml").write_text(dump(cfg))  # the resolved recipe, before step 0

    # ---- data ----
    dcfg = cfg["data"]
    if dcfg["dataset"] == "imagenet":
        tr, te = imagenet_folders(dcfg["root"], dcfg["image_size"], dcfg["resize"])
        num_classes, input_size = len(tr.classes), dcfg["image_size"]
        stream = FolderStream(tr, t["batch_size"], t["seed"], d, dcfg["workers"])
        spe, n_train = stream.steps_per_epoch, len(tr)
        preprocessing = {"kind": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": dcfg["resize"], "crop": input_size}

        def batches_from(k):
            return stream.iterate(k)

        def test_batches():
            from torch.utils.data import DataLoader

            return iter(DataLoader(te, batch_size=t["eval_batch_size"], num_workers=dcfg["workers"]))
    else:
        data = load_tensor_data(cfg)
        num_classes, input_size, n_train = data.num_classes, data.image_size, len(data.x_train)
        data_device = device if dcfg["on_device"] else torch.device("cpu")
        tb = TensorBatches(data.x_train, data.y_train, t["batch_size"], data.mean, data.std, dcfg["augment"], t["seed"], data_device, d.rank, d.world)
        spe = tb.steps_per_epoch
        preprocessing = {"kind": "tensor", "mean": list(data.mean), "std": list(data.std), "input_size": input_size, "dataset": data.name, "encoding": data.encoding}

        def batches_from(k):
            while True:
                yield tb.batch(k)
                k += 1

        def test_batches():
            return tb.test_batches(data.x_test, data.y_test, t["eval_batch_size"])

    total = int(t["iterations"]) if t["iterations"] is not None else int(math.ceil(t["epochs"] * spe))

    # ---- model and optimizer ----
    torch.manual_seed(t["seed"])
    model_args = {"num_classes": num_classes, **cfg["model"]["args"]}
    try:
        model = create_model(cfg["model"]["name"], **model_args)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"model {cfg['model']['name']}: {e}") from None
    if init_from is not None and state is None:
        src = ckpt_io.load(init_from, prefer="best")
        fresh = ckpt_io.load_model_state(model, src["model_state"], f"--init-from {src['_path']}", t["init_skip_mismatched"])
        if fresh:
            cb_note = f"--init-from: kept fresh initialisation for {', '.join(fresh)} (shapes differ)"
            warnings.warn(cb_note, stacklevel=2)
    if d.world > 1 and t["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_allreduce_bn(model)
    model.to(device)
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg["optim"], device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t["amp"]]
    if amp_dtype is not None and device.type != "cuda":
        raise TrainingError("train.amp needs a CUDA device; use train.amp=none on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start, best, best_step, acc, last_good = 0, -1.0, None, Accum(), None
    if state is not None:
        # model_state was saved from the plain module; AllReduce/Sync BN keep the same keys.
        ckpt_io.load_model_state(unwrap(model), state["model_state"], state["_path"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        random.setstate(_tuple(state["rng"]["python"]))
        start, best, last_good = int(state["step"]), float(state["best_top1"]), int(state["step"])
        best_step = state.get("best_step")
        acc = Accum(**state["accum"])
        if d.main:
            _truncate_logs(run_dir, start, state.get("last_row"))

    train_model = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t["compile"]:
        train_model = torch.compile(train_model)
    graphed = use_cuda_graph(t["cuda_graph"], device, d.world, t["amp"])
    step_fn = TrainStep(train_model, opt, scaler, device, amp_dtype, t["channels_last"], graph=graphed, start_step=start)

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
            raise NonFiniteLoss(bad, run_dir, last_good)

    def take_stats() -> None:
        st = step_fn.take_stats()
        vals = [st.loss_sum, st.correct, st.count]
        if d.world > 1:  # log the global batch, not this rank's slice
            v = torch.tensor(vals, dtype=torch.float64, device=device)
            dist.all_reduce(v)
            vals = v.tolist()
        acc.loss += vals[0]
        acc.correct += vals[1]
        acc.count += vals[2]

    def save(step: int, row: dict | None, is_best: bool) -> None:
        if not d.main:
            return
        obj = {
            "format": ckpt_io.FORMAT,
            "model_name": cfg["model"]["name"],
            "model_args": model_args,
            "model_state": clean_state_dict(model),
            "optimizer": host_lrs(opt.state_dict()),
            "scheduler": host_lrs(sched.state_dict()),
            "scaler": scaler.state_dict(),
            "step": step,
            "total_steps": total,
            "epoch": step / spe,
            "best_top1": best,
            "best_step": best_step,
            "accum": acc.state(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "python": _lists(random.getstate())},
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
            "preprocessing": preprocessing,
            "shifts": shift_values(model),
            "last_row": row,
        }
        ckpt_io.save_atomic(obj, run_dir / "checkpoints" / "last.pt")
        if is_best:
            ckpt_io.save_atomic(obj, run_dir / "checkpoints" / "best.pt")
        _append_shifts(run_dir / "shifts.csv", step, obj["shifts"])

    if state is None and d.main:
        _append_shifts(run_dir / "shifts.csv", 0, shift_values(model))  # the starting point of every shift

    cb.on_start({"run_dir": str(run_dir), "total": total, "start": start, "device": str(device), "world": d.world,
                 "model": cfg["model"]["name"], "steps_per_epoch": spe, "train_images": n_train, "cuda_graph": graphed})

    stop = {"flag": False}
    old_handlers = {}

    def request_stop(signum, frame):
        if stop["flag"]:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["flag"] = True

    if d.main or d.world == 1:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    batches = batches_from(start)
    interval_start, interval_steps = time.time(), 0
    summary_row: dict | None = None
    # On the CPU reading the statistics costs nothing, so a non-finite loss is caught at once;
    # on a GPU the host reads them only at log, evaluation and checkpoint points.
    check_every = 1 if device.type == "cpu" else t["log_every"]
    train_model.train()
    try:
        for step in range(start, total):
            if stop["flag"] or (d.world > 1 and step % t["log_every"] == 0 and _any_rank(stop["flag"], device)):
                check_finite(step)
                take_stats()
                save(step, None, False)
                raise Interrupted(step, run_dir)
            x, y = next(batches)
            step_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            sched.step()
            interval_steps += 1
            done = step + 1
            is_log = done % t["log_every"] == 0 or done == total
            is_eval = done % t["eval_every"] == 0 or done == total
            is_ckpt = done % t["ckpt_every"] == 0
            if done % check_every == 0 or is_log or is_eval or is_ckpt:
                check_finite(done)
            if is_log or is_eval or is_ckpt:
                take_stats()
            if is_log:
                el = max(time.time() - interval_start, 1e-9)
                cb.on_step(done, total, {"loss": acc.loss / max(acc.count, 1), "top1": 100 * acc.correct / max(acc.count, 1),
                                         "lr": _lr_of(opt), "images_per_s": interval_steps * t["batch_size"] / el})
            if is_eval:
                seconds = time.time() - interval_start
                res = evaluate(unwrap(model), test_batches(), device, amp_dtype, t["channels_last"])
                train_model.train()
                row = {"step": done, "epoch": round(done / spe, 4), "lr": _lr_of(opt),
                       "train_loss": acc.loss / max(acc.count, 1), "train_top1": 100 * acc.correct / max(acc.count, 1),
                       **res, "seconds": round(seconds, 3), "images_per_s": round(interval_steps * t["batch_size"] / max(seconds, 1e-9), 1)}
                improved = res["test_top1"] > best
                best = max(best, res["test_top1"])
                best_step = done if improved else best_step
                acc = Accum()
                save(done, row, improved)
                if d.main:
                    _append_row(run_dir / "metrics.csv", row)
                cb.on_eval(row)
                summary_row, last_good = row, done
                interval_start, interval_steps = time.time(), 0
            elif is_ckpt:
                save(done, None, False)
                last_good = done
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    return {"run_dir": str(run_dir), "steps": total, "best_top1": best, "last": summary_row, "cuda_graph": graphed}


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


def _lists(obj):
    return [_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _tuple(obj):
    return tuple(_tuple(v) for v in obj) if isinstance(obj, list) else obj


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k) for k in METRIC_COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def _append_shifts(path: Path, step: int, shifts: dict) -> None:
    if not shifts:
        return
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "layer", "channel", "alpha", "beta"])
        for layer, s in shifts.items():
            for c, (a, b) in enumerate(s.tolist()):
                w.writerow([step, layer, c, f"{a:.6g}", f"{b:.6g}"])


def _truncate_logs(run_dir: Path, step: int, last_row: dict | None) -> None:
    """Drop log rows written after the checkpoint being resumed (they will be redone)."""
    import pandas as pd

    m = run_dir / "metrics.csv"
    df = pd.read_csv(m) if m.exists() else pd.DataFrame(columns=METRIC_COLUMNS)
    df = df[df["step"] <= step]
    if last_row is not None and not (df["step"] == step).any():  # killed between the checkpoint and its row
        df = pd.concat([df, pd.DataFrame([last_row])[METRIC_COLUMNS]], ignore_index=True) if len(df) else pd.DataFrame([last_row])[METRIC_COLUMNS]
    if m.exists() or len(df):
        df.to_csv(m, index=False)
    s = run_dir / "shifts.csv"
    if s.exists():
        df = pd.read_csv(s)
        df[df["step"] <= step].to_csv(s, index=False)
