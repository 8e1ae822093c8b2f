"""`asl export` and the ONNX Runtime side of `asl profile models`: zoo models and checkpoints
written as standard ONNX, checked against PyTorch, and timed in ONNX Runtime's CPU provider."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import MissingRuntime
from ...export import SHIFT_FORMS, ExportError, export_onnx, has_shift
from ...train import checkpoint as ckpt_io
from ...zoo import count_macs, count_parameters, get_entry
from ...zoo.paper import PAPER
from ..bench import median_ms, provenance, results_dir
from .predict import class_names, top_classes
from ..benchmarks.profile_models import load_spec, measured_top1

INSTALL = "pip install 'asl-cli[deploy]'  (onnx, onnxruntime, onnxscript)"


def require_deploy() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingRuntime(f"ONNX export and ONNX Runtime need the deploy extra ({e.name} is missing): {INSTALL}") from e


def load(spec: str, with_checkpoint: bool = False):
    """(label, zoo name, model, input size) for a zoo name or a checkpoint (file or run folder),
    and the checkpoint itself (None for a zoo name) with `with_checkpoint`. The input size is the
    checkpoint's preprocessing's, else the zoo entry's."""
    label, name, model, ck = load_spec(spec)
    prep = (ck or {}).get("preprocessing") or {}
    size = int(prep.get("crop") or prep.get("input_size") or get_entry(name).input_size)
    out = label, name, model.eval(), size
    return (*out, ck) if with_checkpoint else out


def export(spec: str, out: Path, shift_form: str = "conv", size: int | None = None, check: bool = True) -> dict:
    """Writes the ONNX file of a zoo model or checkpoint; with `check`, runs it in ONNX Runtime on
    random inputs and reports the largest difference to PyTorch's logits, relative to their scale."""
    require_deploy()
    import onnx

    label, name, model, s, ck = load(spec, with_checkpoint=True)
    s = size or s
    info = export_onnx(model, out, (1, 3, s, s), shift_form)
    proto = onnx.load(str(out))
    meta = {"asl.model": name, "asl.source": label, "asl.input_size": str(s), "asl.shift_form": shift_form}
    if ck is not None:  # what `asl predict` needs to read images for the file alone
        meta["asl.preprocessing"] = json.dumps(ck.get("preprocessing") or {})
        meta["asl.classes"] = json.dumps(class_names(ck, int(model(torch.zeros(1, 3, s, s)).shape[1])))
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(out))
    info.update(model=label, arch=name, input_size=s)
    if check:
        x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x).numpy()
        got = session(out, threads=1).run(None, {"input": x.numpy()})[0]
        info["max_rel_diff"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    return info


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads, every graph optimisation on."""
    require_deploy()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtModel(torch.nn.Module):
    """An ONNX Runtime session behind a module's call, for code that takes a model (evaluation,
    latency): CPU tensors in, CPU tensors out."""

    def __init__(self, path: str | Path, threads: int = 1):
        super().__init__()
        self.sess = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {"input": x.detach().float().cpu().numpy()})[0])

    def __deepcopy__(self, memo):  # a session cannot be copied; timing code copies models
        return self


def onnx_metadata(path: str | Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def profile(specs: list[str], threads: int = 1, batch: int = 8, min_run_time: float = 1.0,
            shift_forms: tuple[str, ...] = SHIFT_FORMS) -> list[dict]:
    """One row per (model, shift form) at batch 1 and `batch` on `threads` threads of ONNX
    Runtime's CPU provider; `fastest` marks each model's quickest form at batch 1. A spec may be a
    zoo name, a checkpoint or an exported .onnx file."""
    require_deploy()
    import onnxruntime as ort

    prov = provenance("cpu", threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if spec.endswith(".onnx"):
                meta = onnx_metadata(spec)
                name, s = meta.get("asl.model"), int(meta.get("asl.input_size", 0))
                if not name or not s:
                    raise ExportError(f"{spec} was not written by asl export (no asl.model / asl.input_size metadata)")
                files = [(meta.get("asl.shift_form", "-"), Path(spec))]
                from ...zoo import create_model

                model, label = create_model(name), spec
            else:
                label, name, model, s = load(spec)
                shifted = has_shift(model)
                files = []
                for f in shift_forms if shifted else ("conv",):
                    path = Path(tmp) / f"{Path(label).name}-{f}.onnx"
                    export_onnx(model, path, (1, 3, s, s), f)
                    files.append((f if shifted else "-", path))
            macs, params = count_macs(model, s), count_parameters(model)
            paper = PAPER.get(name, {})
            mine = []
            for form, path in files:
                sess = session(path, threads)
                x1 = np.random.default_rng(0).standard_normal((1, 3, s, s), dtype=np.float32)
                xb = np.random.default_rng(1).standard_normal((batch, 3, s, s), dtype=np.float32)
                ms1 = median_ms(lambda: sess.run(None, {"input": x1}), threads, min_run_time)
                msb = median_ms(lambda: sess.run(None, {"input": xb}), threads, min_run_time)
                mine.append({"model": label, "arch": name, "runtime": f"onnxruntime {ort.__version__}",
                             "provider": "CPUExecutionProvider", "shift_form": form, "params": params, "macs": macs,
                             "input_size": s, "cpu_ms_batch1": round(ms1, 3), "batch": batch,
                             f"cpu_ms_batch{batch}": round(msb, 3), "images_per_s_batchN": round(batch * 1e3 / msb, 1),
                             "cpu_gmacs_per_s": round(macs / ms1 / 1e6, 2),
                             "top1": measured_top1(name, results_dir() / "eval.csv"), "paper_top1": paper.get("top1"),
                             "paper_cpu_ms": paper.get("cpu_ms"), **prov})
            best = min(mine, key=lambda r: r["cpu_ms_batch1"])
            for r in mine:
                r["fastest"] = r is best
            rows += mine
    return rows


def predict(path: str | Path, images: list[str | Path], topk: int = 5) -> list[dict]:
    """`asl predict --runtime onnxruntime`: top-k classes of images with an exported file, or with
    a checkpoint exported on the fly, read with the preprocessing recorded at export."""
    require_deploy()
    from ...data.preprocess import load_image, to_input

    with tempfile.TemporaryDirectory() as tmp:
        if str(path).endswith(".onnx"):
            onnx_path = Path(path)
            if not onnx_path.is_file():
                raise ckpt_io.CheckpointError(f"no such file: {onnx_path}")
        else:
            onnx_path = Path(tmp) / "model.onnx"
            export(str(path), onnx_path, check=False)
        meta = onnx_metadata(onnx_path)
        if "asl.preprocessing" not in meta:
            raise ExportError(f"{path} holds no preprocessing (export a checkpoint, not a zoo model, to predict with it)")
        prep, names = json.loads(meta["asl.preprocessing"]), json.loads(meta["asl.classes"])
        sess = session(onnx_path)
        return [top_classes(img, torch.from_numpy(sess.run(None, {"input": to_input(load_image(img), prep).numpy()})[0]),
                            names, topk) for img in images]
