"""`asl eval`: accuracy, loss, size, MACs and latency of a trained checkpoint, one CSV row."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..config import load_config
from ..data import TensorBatches, imagenet_folders, load_tensor_data
from ..engine import evaluate
from ..zoo import count_macs, count_parameters, get_entry
from .bench import median_ms, provenance


def latency(model: torch.nn.Module, input_size: int, device: str) -> dict:
    """CPU: one thread, batch 1 (ms). GPU: batch 1 (ms) and batch-256 throughput (images/s)."""
    model = copy.deepcopy(model).eval()
    out = {}
    x = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        out["cpu_ms_batch1"] = round(median_ms(lambda: model(x), threads=1, min_run_time=0.5), 3)
        if device.startswith("cuda") and torch.cuda.is_available():
            m = model.to(device)
            x1 = x.to(device)
            out["gpu_ms_batch1"] = round(median_ms(lambda: m(x1), min_run_time=0.5), 3)
            xb = torch.randn(256, 3, input_size, input_size, device=device)
            out["gpu_images_per_s_batch256"] = round(256 / (median_ms(lambda: m(xb), min_run_time=0.5) / 1e3), 1)
    return out


def run(path: str | Path, split: str = "test", device: str = "auto", with_latency: bool = True,
        overrides: tuple[str, ...] = ()) -> dict:
    ckpt = ckpt_io.load(path, prefer="best")
    model = ckpt_io.build_model(ckpt)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cfg = load_config(ckpt["config"], list(overrides)) if ckpt.get("config") else None
    if cfg is None:
        raise ckpt_io.CheckpointError(f"{ckpt['_path']} records no dataset; pass data.* overrides")
    d, t = cfg["data"], cfg["train"]
    if d["dataset"] == "imagenet":
        from torch.utils.data import DataLoader

        from torchvision.datasets import ImageFolder

        from ..preprocess import FolderTransform

        imagenet_folders(d["root"], d["image_size"], d["resize"])  # checks the layout
        folder = Path(d["root"]) / ("val" if split == "test" else "train")
        # the checkpoint's own preprocessing (an imported Caffe model expects BGR, 0-255 scale)
        ds = ImageFolder(str(folder), FolderTransform(ckpt["preprocessing"]))
        batches = iter(DataLoader(ds, batch_size=t["eval_batch_size"], num_workers=d["workers"]))
    else:
        data = load_tensor_data(cfg)
        tb = TensorBatches(data.x_train, data.y_train, min(t["batch_size"], len(data.x_train)), data.mean, data.std, False, 0, dev)
        x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
        batches = tb.test_batches(x, y, t["eval_batch_size"])
    model.to(dev)
    res = evaluate(model, batches, dev)
    model.cpu()
    entry = get_entry(ckpt["model_name"])
    input_size = ckpt.get("preprocessing", {}).get("input_size") or ckpt.get("preprocessing", {}).get("crop") or entry.input_size
    row = {
        "checkpoint": ckpt["_path"],
        "model": ckpt["model_name"],
        "dataset": d["dataset"],
        "split": split,
        "step": ckpt.get("step"),
        "top1": round(res["test_top1"], 3),
        "top5": round(res["test_top5"], 3),
        "loss": round(res["test_loss"], 5),
        "params": count_parameters(model),
        "macs": count_macs(model, input_size),
        "input_size": input_size,
    }
    if with_latency:
        row.update(latency(model, input_size, str(dev)))
    row.update(provenance(str(dev), None))
    return row
