"""Recipes: YAML files in `recipes/` (or any path) merged over built-in defaults, then dotted
`key=value` overrides (values parsed as YAML scalars), validated with helpful errors."""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from .allocator import MAX_PAD_MIB

# Installed from a wheel the recipes ship inside the package; in a source checkout they are the
# top-level recipes/ folder.
_HERE = Path(__file__).resolve().parent
RECIPES_DIR = _HERE / "recipes" if (_HERE / "recipes").is_dir() else _HERE.parent / "recipes"


from .errors import ConfigError  # noqa: F401  (raised here; importable from here as before)

DEFAULT_RECIPE = "quick"  # what `asl train` and `asl ablate` use when no recipe is named


# Every key a recipe may set, with its default. None means "no default / optional"; its type is
# then taken from TYPES below.
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "description": "",
    "model": {"name": "asnet20_16x1", "args": {}},
    "data": {
        "dataset": "synthetic",  # synthetic | cifar10 | cifar100 | imagenet | npz | folder
        "root": "data",
        "path": None,  # the .npz file for dataset npz, the DIR (DIR/train/<class>/, DIR/test/<class>/) for folder
        "cache": "auto",  # folder: where decoded images are cached (auto: $ASL_CACHE_DIR or ~/.cache/asl; none: off)
        "download": True,
        "augment": True,
        "train_size": 10000,  # synthetic only
        "test_size": 2000,  # synthetic only
        "seed": 0,  # synthetic only
        "image_size": 224,  # imagenet crop
        "resize": 256,  # imagenet resize
        "workers": 4,  # imagenet loader processes
        "on_device": True,  # keep tensor datasets and their augmentation on the training device
    },
    "train": {
        "iterations": None,  # total optimizer steps; or give epochs
        "epochs": None,
        "batch_size": 128,
        "eval_every": 1000,
        "ckpt_every": 1000,
        "log_every": 20,
        "eval_batch_size": 500,
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "amp": "none",  # none | bf16 | fp16 (CUDA)
        "channels_last": "auto",  # auto | true | false: NHWC activations (auto: on the CPU)
        "fuse_bn_relu": "auto",  # auto | true | false: BatchNorm-ReLU pairs as one operator in training (auto: CPU, channels_last)
        "compile": "auto",  # auto | true | false: torch.compile the model (auto: on the CPU for runs long enough to pay)
        "malloc_pad_mib": "auto",  # auto | MiB: freed memory glibc's malloc keeps for the next step (auto: 1024 on the CPU)
        "cuda_graph": "auto",  # auto | true | false: capture the whole step as a CUDA graph (auto: on for one CUDA process without fp16)
        "sync_bn": True,  # synchronised BatchNorm statistics under DistributedDataParallel
        "deterministic": False,
        "init_skip_mismatched": False,  # --init-from: keep fresh weights where shapes differ (new classifier)
    },
    "optim": {
        "name": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "shift_lr_mult": 0.01,
        "shift_lr_reference_iterations": None,  # set: the shifts' rate is scaled by sqrt(reference / train.iterations)
        "normalize_shift_grad": True,
    },
    "schedule": {
        "type": "multistep",  # multistep | linear | cosine | constant
        "milestones": [],  # iterations
        "gamma": 0.1,
        "warmup": 0,  # iterations of linear warm-up
    },
    "output": {"dir": None, "runs_root": "runs"},
    # what each run's job asks a cluster for (asl sweep/ablate --executor slurm|local|cluster)
    "cluster": {"partition": None, "timeout_min": 240, "gpus_per_node": 0, "cpus_per_task": None, "nodes": 1, "mem_gb": None},
}

TYPES: dict[str, tuple] = {
    "data.path": (str,),
    "data.cache": (str, bool),
    "train.iterations": (int,),
    "train.epochs": (int, float),
    "output.dir": (str,),
    "train.cuda_graph": (str, bool),
    "train.compile": (str, bool),
    "train.channels_last": (str, bool),
    "train.fuse_bn_relu": (str, bool),
    "train.malloc_pad_mib": (str, int),
    "optim.shift_lr_reference_iterations": (int,),
    "cluster.partition": (str,),
    "cluster.cpus_per_task": (int,),
    "cluster.mem_gb": (int, float),
}

CHOICES = {
    "data.dataset": ("synthetic", "cifar10", "cifar100", "imagenet", "npz", "folder"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.cuda_graph": ("auto", True, False),
    "train.compile": ("auto", True, False),
    "train.channels_last": ("auto", True, False),
    "train.fuse_bn_relu": ("auto", True, False),
    "optim.name": ("sgd",),
    "schedule.type": ("multistep", "linear", "cosine", "constant"),
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("model.args",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_FLAT_DEFAULTS = _flatten(DEFAULTS)
VALID_KEYS = set(_FLAT_DEFAULTS)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(VALID_KEYS), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _check_value(key: str, value: Any) -> None:
    if key.startswith("model.args."):
        return
    default = _FLAT_DEFAULTS.get(key)
    allowed = TYPES.get(key) or ((type(default),) if default is not None else None)
    if value is None or allowed is None:
        return
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if int in allowed and isinstance(value, bool):
        raise ConfigError(f"{key} must be {allowed[0].__name__}, got {value!r}")
    if not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{key} must be {names}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(str(c).lower() for c in CHOICES[key])}, got {value!r}")


def _merge(base: dict, new: dict, prefix: str = "") -> dict:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if key.startswith("model.args"):
            if key == "model.args" and not isinstance(v, dict):
                raise ConfigError(f"model.args must be a mapping of create_model overrides, got {v!r}")
            if key == "model.args":  # merge, so several model.args.* overrides add up
                base[k] = {**base.get(k, {}), **copy.deepcopy(v)}
            else:
                base[k] = v
            continue
        if k not in base:
            raise ConfigError(f"unknown key {key!r}{_suggest(key)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a mapping, got {v!r}")
            _merge(base[k], v, key + ".")
        else:
            v = _coerce(key, v)
            _check_value(key, v)
            base[k] = v
    return base


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if candidate.exists():
        return candidate
    close = difflib.get_close_matches(recipe, list_recipes(), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(list_recipes())}"
    raise ConfigError(f"unknown recipe {recipe!r}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not raw.strip():
        raise ConfigError(f"override {key}= has no value; write {key}=VALUE (or {key}=null to unset it)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of {key}: {e}") from None
    return key, value


def _coerce(key: str, value: Any) -> Any:
    """YAML 1.1 reads 1e-3 and 1e30 as strings; where a number is expected, users mean one."""
    default = _FLAT_DEFAULTS.get(key)
    allowed = TYPES.get(key) or ((type(default),) if default is not None else ())
    if isinstance(value, str) and (float in allowed or int in allowed) and str not in allowed:
        try:
            number = float(value)
        except ValueError:
            return value
        if int in allowed and float not in allowed and number.is_integer():
            return int(number)
        return number if float in allowed else value
    return value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def read_recipe(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a mapping, with its `base:` recipe (a name in recipes/ or a path relative
    to this file) merged underneath: the file's own keys win, lists are replaced, not joined."""
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a .yaml file or a recipe name")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"recipe {path} cannot be read as a YAML text file ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe name or path, got {base!r}")
    local = path.parent / (base if base.endswith((".yaml", ".yml")) else f"{base}.yaml")
    base_path = local if local.is_file() else resolve_recipe_path(base)
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        raise ConfigError(f"recipe {path}: base recipes form a cycle ({' -> '.join(p.name for p in chain)} -> {base_path.name})")
    return _overlay(read_recipe(base_path, chain), data)


def _overlay(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(recipe: str | Path | dict | None = "quick", overrides: list[str] | tuple = ()) -> dict:
    """Defaults <- recipe <- overrides, validated. `recipe` is a name in recipes/, a path, or a dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if isinstance(recipe, dict):
        data, source = recipe, "<dict>"
    elif recipe is not None:
        path = resolve_recipe_path(str(recipe))
        data, source = read_recipe(path), str(path)
        data.setdefault("name", path.stem)
    else:
        data, source = {}, "<defaults>"
    _merge(cfg, data)
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith("model.args.") and key not in VALID_KEYS:
            raise ConfigError(f"unknown key {key!r}{_suggest(key)}")
        _merge(cfg, _nest(key, value))
    validate(cfg)
    cfg["_source"] = source
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: dict) -> None:
    t, o, s, d = cfg["train"], cfg["optim"], cfg["schedule"], cfg["data"]
    _require(t["iterations"] is not None or t["epochs"] is not None, "set train.iterations or train.epochs")
    _require(t["iterations"] is None or t["iterations"] >= 1, f"train.iterations must be >= 1, got {t['iterations']}")
    _require(t["epochs"] is None or (math.isfinite(t["epochs"]) and t["epochs"] > 0), f"train.epochs must be > 0, got {t['epochs']}")
    for key in ("batch_size", "eval_every", "ckpt_every", "log_every", "eval_batch_size"):
        _require(t[key] >= 1, f"train.{key} must be >= 1, got {t[key]}")
    mp = t["malloc_pad_mib"]
    _require(mp == "auto" or (isinstance(mp, int) and not isinstance(mp, bool) and 0 <= mp <= MAX_PAD_MIB),
             f"train.malloc_pad_mib must be auto or a number of MiB from 0 to {MAX_PAD_MIB}, got {mp!r}")
    _require(math.isfinite(o["lr"]) and o["lr"] > 0, f"optim.lr must be a finite number > 0, got {o['lr']}")
    _require(0 <= o["momentum"] < 1, f"optim.momentum must be in [0, 1), got {o['momentum']}")
    _require(o["weight_decay"] >= 0, f"optim.weight_decay must be >= 0, got {o['weight_decay']}")
    _require(o["shift_lr_mult"] >= 0, f"optim.shift_lr_mult must be >= 0, got {o['shift_lr_mult']}")
    ref = o["shift_lr_reference_iterations"]
    _require(ref is None or ref >= 1, f"optim.shift_lr_reference_iterations must be >= 1, got {ref}")
    _require(ref is None or t["iterations"] is not None,
             "optim.shift_lr_reference_iterations scales the shifts' rate by the schedule's length: give train.iterations, not epochs")
    _require(s["gamma"] > 0, f"schedule.gamma must be > 0, got {s['gamma']}")
    _require(s["warmup"] >= 0, f"schedule.warmup must be >= 0, got {s['warmup']}")
    ms = s["milestones"]
    _require(isinstance(ms, list) and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms),
             f"schedule.milestones must be a list of iteration numbers >= 1, e.g. [32000,48000], got {ms!r}")
    _require(ms == sorted(ms), f"schedule.milestones must be increasing, got {ms}")
    if d["dataset"] == "synthetic":
        _require(d["train_size"] >= 1 and d["test_size"] >= 1,
                 f"data.train_size and data.test_size must be >= 1, got {d['train_size']} and {d['test_size']}")
    _require(d["workers"] >= 0 and d["image_size"] >= 1 and d["resize"] >= 1, "data.workers must be >= 0 and data.image_size, data.resize >= 1")
    if cfg["data"]["dataset"] == "npz" and not cfg["data"]["path"]:
        raise ConfigError("data.dataset=npz needs data.path=/path/to/file.npz")
    if cfg["data"]["dataset"] == "folder" and not cfg["data"]["path"]:
        raise ConfigError("data.dataset=folder needs data.path=DIR (with DIR/train/<class>/<image> and DIR/test/<class>/<image>)")
    from .zoo import get_entry

    try:
        get_entry(cfg["model"]["name"])
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None


# One line per key for `asl config`: what it does, beyond its type and choices.
KEY_HELP = {
    "model.name": "a zoo model (asl zoo)",
    "model.args": "create_model keyword overrides, e.g. model.args.shift_mode=SR",
    "data.path": "the .npz file (npz) or DIR with DIR/train/<class>/ and DIR/test/<class>/ (folder)",
    "data.cache": "folder: decoded-image cache (auto: $ASL_CACHE_DIR or ~/.cache/asl; none: off)",
    "data.train_size": "synthetic only", "data.test_size": "synthetic only", "data.seed": "synthetic only",
    "data.image_size": "imagenet crop", "data.resize": "imagenet resize", "data.workers": "imagenet loader processes",
    "data.on_device": "keep tensor datasets and their augmentation on the training device",
    "train.iterations": "total optimizer steps (or give train.epochs)",
    "train.device": "auto, cpu, cuda or cuda:N",
    "train.cuda_graph": "capture the whole step as a CUDA graph (auto: one CUDA process without fp16)",
    "train.compile": "torch.compile the model (auto: on the CPU, with a C++ compiler, for runs of >= 1000 steps)",
    "train.channels_last": ("channels_last (NHWC) activations and weights (auto: on the CPU, where oneDNN's 1x1 convolutions "
                            "and BatchNorm run faster on them; NCHW on CUDA)"),
    "train.fuse_bn_relu": ("run each BatchNorm2d followed by a ReLU as one operator in training (asl_cli.nn.BatchNormReLU2d; five passes "
                           "over the activations instead of about eight), and each residual block's addition in its last convolution's call "
                           "(asl_cli.nn.ResidualConv2d) and, in channels_last, each identity block's pre-activation in its first 1x1 "
                           "convolution (asl_cli.nn.bn_relu_conv_skip); auto: on the CPU in channels_last"),
    "train.malloc_pad_mib": ("MiB of freed memory glibc's malloc keeps instead of returning it to the system after every "
                             "step (auto: 1024 on the CPU unless MALLOC_TOP_PAD_ or the like is set; 0: glibc's default)"),
    "train.sync_bn": "synchronised BatchNorm statistics under DistributedDataParallel",
    "train.init_skip_mismatched": "--init-from: keep fresh weights where shapes differ",
    "optim.shift_lr_mult": "the shifts' learning rate as a multiple of optim.lr",
    "optim.normalize_shift_grad": "divide each channel's shift gradient by its L2 norm (the authors' solver)",
    "optim.shift_lr_reference_iterations": "the schedule length shift_lr_mult was set for (64000 for the paper's CIFAR solver); "
                                           "a run of another length scales the shifts' rate by sqrt(reference / iterations), "
                                           "so that its shifts travel as far (results/README.md)",
    "schedule.milestones": "iterations at which multistep multiplies the rate by gamma",
    "schedule.warmup": "iterations of linear warm-up",
    "output.dir": "the run folder (default: <runs_root>/<time>-<name>-<model>)",
    "cluster.partition": "Slurm partition of each run's job", "cluster.timeout_min": "each job's time limit (it requeues itself)",
    "cluster.gpus_per_node": "GPUs per job, one process each (DistributedDataParallel)",
}


def _allowed(key: str) -> str:
    if key in CHOICES:
        return "one of " + ", ".join(str(c).lower() for c in CHOICES[key])
    default = _FLAT_DEFAULTS.get(key)
    types = TYPES.get(key) or ((type(default),) if default is not None else ())
    return " or ".join(t.__name__ for t in types)


def describe(cfg: dict) -> str:
    """The resolved config as YAML, each key followed by a comment with its default, the values it
    takes and what it does."""
    def scalar(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    lines = []

    def walk(d: dict, defaults: dict, prefix: str, indent: int) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(defaults.get(k), dict) and key != "model.args":
                lines.append(" " * indent + f"{k}:")
                walk(v, defaults[k], key + ".", indent + 2)
                continue
            text = " " * indent + f"{k}: {scalar(v)}"
            notes = [f"default {scalar(defaults.get(k))}"] + [n for n in (_allowed(key), KEY_HELP.get(key)) if n]
            lines.append(f"{text:<40} # " + "; ".join(notes))

    walk({k: v for k, v in cfg.items() if not k.startswith("_")}, DEFAULTS, "", 0)
    return "\n".join(lines) + "\n"


# Keys that say where things are or how a run is executed, not what is trained: two configs that
# differ only in these train the same network the same way, so a run made with one may be reused or
# resumed for the other. (Device, compile and memory-format knobs change speed, not the recipe.)
EXECUTION_KEYS = ("name", "description", "data.root", "data.path", "data.cache", "data.download", "data.workers",
                  "data.on_device", "train.log_every", "train.ckpt_every", "train.eval_batch_size", "train.device",
                  "train.compile", "train.channels_last", "train.fuse_bn_relu", "train.malloc_pad_mib", "train.cuda_graph")
EXECUTION_PREFIXES = ("output.", "cluster.")


def _model_args(cfg: dict) -> dict:
    """model.args with the model's own defaults filled in, so that an argument left at its default
    and the same value given explicitly compare equal."""
    import inspect

    from .zoo import get_entry

    args = dict(cfg["model"].get("args") or {})
    try:
        entry = get_entry(cfg["model"]["name"])
    except KeyError:
        return args
    params = inspect.signature(entry.factory).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "num_classes"}
    return {**full, **entry.fixed, **args}


def training_differences(saved: dict, wanted: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, wanted value) for every key that changes what is trained; keys of
    EXECUTION_KEYS and under output./cluster. are left out."""
    def flat(cfg: dict) -> dict:
        f = _flatten({k: v for k, v in cfg.items() if not k.startswith("_")})
        f.pop("model.args", None)
        f.update({f"model.args.{k}": v for k, v in _model_args(cfg).items()})
        return {k: v for k, v in f.items() if k not in EXECUTION_KEYS and not k.startswith(EXECUTION_PREFIXES)}

    a, b = flat(saved), flat(wanted)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def format_differences(diffs: list[tuple[str, object, object]], limit: int = 6) -> str:
    """'key: saved -> wanted' for the first `limit` differences, joined with '; '."""
    text = "; ".join(f"{k}: {dump_scalar(a)} -> {dump_scalar(b)}" for k, a, b in diffs[:limit])
    return text + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def dump_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def dump(cfg: dict) -> str:
    return yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=False)
