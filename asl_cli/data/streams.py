"""A training run's data as the loop consumes it: batches from any global step on (sharded across
processes, the same at every resume) and test batches, from tensors or image folders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config import ConfigError
from . import IMAGENET_MEAN, IMAGENET_STD, TensorBatches, imagenet_folders, load_tensor_data, steps_per_epoch


class FolderStream:
    """ImageFolder batches from a given global step on (DistributedSampler-style sharding)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, workers: int):
        if batch_size % world:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.ds, self.batch_size, self.seed, self.rank, self.world, self.workers = dataset, batch_size, seed, rank, world, workers
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size)

    def iterate(self, start: int):
        from torch.utils.data import DataLoader, Subset

        local = self.batch_size // self.world
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.ds), generator=g)[: self.steps_per_epoch * self.batch_size]
            mine = perm.view(self.steps_per_epoch, self.world, local)[skip:, self.rank].reshape(-1).tolist()
            loader = DataLoader(Subset(self.ds, mine), batch_size=local, shuffle=False, num_workers=self.workers,
                                pin_memory=torch.cuda.is_available(), persistent_workers=False)
            yield from loader
            epoch, skip = epoch + 1, 0


@dataclass
class TrainData:
    """What the loop needs from a data set: batches from any global step on, and test batches."""

    num_classes: int
    input_size: int
    n_train: int
    steps_per_epoch: int
    preprocessing: dict  # recorded in checkpoints so that eval and predict prepare inputs alike
    batches_from: Callable[[int], Iterator]
    test_batches: Callable[[], Iterator]


def build_data(cfg: dict, rank: int, world: int, device: torch.device) -> TrainData:
    t, dcfg = cfg["train"], cfg["data"]
    if dcfg["dataset"] == "imagenet":
        tr, te = imagenet_folders(dcfg["root"], dcfg["image_size"], dcfg["resize"])
        stream = FolderStream(tr, t["batch_size"], t["seed"], rank, world, dcfg["workers"])

        def test_folder():
            from torch.utils.data import DataLoader

            return iter(DataLoader(te, batch_size=t["eval_batch_size"], num_workers=dcfg["workers"]))

        prep = {"kind": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": dcfg["resize"], "crop": dcfg["image_size"]}
        return TrainData(len(tr.classes), dcfg["image_size"], len(tr), stream.steps_per_epoch, prep, stream.iterate, test_folder)
    data = load_tensor_data(cfg)
    data_device = device if dcfg["on_device"] else torch.device("cpu")
    tb = TensorBatches(data.x_train, data.y_train, t["batch_size"], data.mean, data.std, dcfg["augment"], t["seed"], data_device, rank, world)

    def batches_from(k):
        while True:
            yield tb.batch(k)
            k += 1

    prep = {"kind": "tensor", "mean": list(data.mean), "std": list(data.std), "input_size": data.image_size,
            "dataset": data.name, "encoding": data.encoding}
    return TrainData(data.num_classes, data.image_size, len(data.x_train), tb.steps_per_epoch, prep, batches_from,
                     lambda: tb.test_batches(data.x_test, data.y_test, t["eval_batch_size"]))
