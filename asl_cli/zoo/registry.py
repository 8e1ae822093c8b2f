"""Model registry keyed by name: `create_model(name, **overrides)`, `list_models()`."""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import UnknownModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    dataset: str  # "cifar" or "imagenet"
    input_size: int
    factory: Callable[..., nn.Module]  # a class or function; its keyword arguments are the overrides
    fixed: dict = field(default_factory=dict)  # arguments that define this named model
    description: str = ""

    @property
    def default_classes(self) -> int:
        return 10 if self.dataset == "cifar" else 1000

    def overrides(self) -> list[str]:
        params = inspect.signature(self.factory).parameters
        return [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD]


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, factory: Callable[..., nn.Module], family: str, dataset: str, input_size: int,
             description: str = "", **fixed) -> None:
    if name in _REGISTRY:
        raise RuntimeError(f"model {name!r} registered twice")
    _REGISTRY[name] = ModelEntry(name, family, dataset, input_size, factory, fixed, description)


def list_models(family: str | None = None) -> list[str]:
    return [n for n, e in _REGISTRY.items() if family is None or e.family == family]


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(_REGISTRY)}"
        raise UnknownModel(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model. Overrides go to its constructor (num_classes, spatial, shift_mode,
    shift_seed, width, ...); one it does not take raises a TypeError that lists those it does."""
    entry = get_entry(name)
    valid = entry.overrides()
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise TypeError(f"model {name!r} does not take {', '.join(bad)}; it takes {', '.join(valid)}")
    model = entry.factory(**{**entry.fixed, **overrides})
    model.asl_name = name
    return model
