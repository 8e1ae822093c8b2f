"""`asl predict`: top-k classes of image files with a checkpoint's own preprocessing."""
from __future__ import annotations

from pathlib import Path

import torch

from ...train import checkpoint as ckpt_io
from ...data.preprocess import load_image, to_input


def class_names(ckpt: dict, num_classes: int) -> list[str]:
    prep = ckpt.get("preprocessing", {})
    dataset = (ckpt.get("config") or {}).get("data", {}).get("dataset")
    if prep.get("kind") in ("caffe", "imagenet") and num_classes == 1000:
        from torchvision.models import ResNet50_Weights  # class names ship with torchvision, offline

        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if dataset == "synthetic":
        from ...data import SYNTHETIC_CLASSES

        return list(SYNTHETIC_CLASSES)
    if dataset == "cifar10":
        return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return [f"class {i}" for i in range(num_classes)]


def top_classes(image: str | Path, logits: torch.Tensor, names: list[str], topk: int) -> dict:
    """One image's top-k classes from its (1, classes) logits, as `asl predict` prints them."""
    prob = torch.softmax(logits.float(), dim=1)[0]
    p, idx = prob.topk(min(topk, prob.numel()))
    return {"image": str(image), "top": [{"class": names[i], "index": int(i), "probability": float(q)}
                                         for q, i in zip(p.tolist(), idx.tolist())]}


def predict(checkpoint: str | Path, images: list[str | Path], topk: int = 5, device: str = "cpu") -> list[dict]:
    ckpt = ckpt_io.load(checkpoint, prefer="best")
    model = ckpt_io.build_model(ckpt).eval().to(device)
    prep = ckpt.get("preprocessing") or {}
    out = []
    with torch.no_grad():
        for path in images:
            logits = model(to_input(load_image(path), prep).to(device))
            out.append(top_classes(path, logits, class_names(ckpt, logits.shape[1]), topk))
    return out
