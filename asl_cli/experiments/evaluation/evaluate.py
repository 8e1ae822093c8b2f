"""`asl eval`: accuracy, loss, size, MACs and latency of a trained checkpoint, one CSV row."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ...train import checkpoint as ckpt_io
from ...config import ConfigError, load_config
from ...data import imagenet_folders, load_tensor_data, normalized_batches, normalizer
from ...train import evaluate
from ...zoo import count_macs, count_parameters, get_entry
from ..bench import model_latency, provenance


def run(path: str | Path, split: str = "test", device: str = "auto", with_latency: bool = True,
        overrides: tuple[str, ...] = (), form: str = "eager", runtime: str = "torch") -> dict:
    """`form`: eager, or inference (BatchNorm folded, the shift fused into the 1x1 convolution;
    asl_cli.inference) for both the accuracy and the latency. `runtime` onnxruntime: the model
    exported to standard ONNX (asl_cli.export) and run in ONNX Runtime's CPU provider."""
    ckpt = ckpt_io.load(path, prefer="best")
    model = ckpt_io.build_model(ckpt)
    if form not in ("eager", "inference"):
        raise ConfigError(f"--form must be eager or inference, got {form!r}")
    if runtime not in ("torch", "onnxruntime"):
        raise ConfigError(f"--runtime must be torch or onnxruntime, got {runtime!r}")
    if runtime == "onnxruntime" and (form != "eager" or device not in ("auto", "cpu")):
        raise ConfigError("--runtime onnxruntime runs the exported model on the CPU: leave --form and --device as they are")
    if form == "inference":
        from ...inference import inference_form

        model = inference_form(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asks for a GPU but none is visible; use --device cpu")
    dev = torch.device(device)
    cfg = load_config(ckpt["config"], list(overrides)) if ckpt.get("config") else None
    if cfg is None:
        raise ckpt_io.CheckpointError(f"{ckpt['_path']} records no dataset; pass data.* overrides")
    d, t = cfg["data"], cfg["train"]
    if d["dataset"] == "imagenet":
        from torch.utils.data import DataLoader

        from torchvision.datasets import ImageFolder

        from ...data.preprocess import FolderTransform

        imagenet_folders(d["root"], d["image_size"], d["resize"])  # checks the layout
        folder = Path(d["root"]) / ("val" if split == "test" else "train")
        # the checkpoint's own preprocessing (an imported Caffe model expects BGR, 0-255 scale)
        ds = ImageFolder(str(folder), FolderTransform(ckpt["preprocessing"]))
        batches = iter(DataLoader(ds, batch_size=t["eval_batch_size"], num_workers=d["workers"]))
    else:
        data = load_tensor_data(cfg)
        x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
        batches = normalized_batches(x, y, t["eval_batch_size"], *normalizer(data.mean, data.std, dev), dev)
    entry = get_entry(ckpt["model_name"])
    input_size = ckpt.get("preprocessing", {}).get("input_size") or ckpt.get("preprocessing", {}).get("crop") or entry.input_size
    with tempfile.TemporaryDirectory() as tmp:
        runner = model
        if runtime == "onnxruntime":
            from ...export import export_onnx
            from .deploy import OrtModel, require_deploy

            require_deploy()
            export_onnx(model.eval(), Path(tmp) / "model.onnx", (1, 3, input_size, input_size))
            runner = OrtModel(Path(tmp) / "model.onnx")
        runner.to(dev)
        res = evaluate(runner, batches, dev)
        runner.cpu()
        latency = model_latency(runner, input_size, str(dev)) if with_latency else {}
    row = {
        "checkpoint": ckpt["_path"],
        "model": ckpt["model_name"],
        "dataset": d["dataset"],
        "split": split,
        "form": form,
        "runtime": runtime if runtime == "torch" else f"onnxruntime {_ort_version()}",
        "step": ckpt.get("step"),
        "top1": round(res["test_top1"], 3),
        "top5": round(res["test_top5"], 3),
        "loss": round(res["test_loss"], 5),
        "nonfinite_outputs": int(res["nonfinite"]),
        "params": count_parameters(model),
        "macs": count_macs(model, input_size),
        "input_size": input_size,
    }
    row.update(latency)
    row.update(provenance(str(dev), None))
    return row


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
