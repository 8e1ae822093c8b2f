"""The active shift in ONNX Runtime as a custom operator built on the project's CPU kernel, timed
beside the standard-operator forms `asl export` writes, in one run.

    python scripts/ort_custom_op.py [--threads 1] [--csv results/ort_custom_op.csv]

Each row is one active shift layer of AS-ResNet-w32 (batch 1, its input shapes and strides),
exported alone four ways and timed in ONNX Runtime's CPU provider: the `conv` and `slice` standard
forms, a node of the custom domain `ai.onnx.contrib` served by a Python custom operator
(onnxruntime-extensions' `onnx_op`) that calls torch.ops.asl.active_shift on the buffers ONNX
Runtime hands it, and an Identity node (what one ONNX Runtime call costs with no work). The kernel
itself, called from PyTorch, is the peer the others are divided by. Needs the deploy extra and
`pip install onnxruntime-extensions`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def shift_layers_of(name: str, size: int = 224):
    """(input shape, layer) of each active shift layer the zoo model runs at batch 1."""
    from asl_cli.nn import ActiveShift2d
    from asl_cli.zoo import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    found = []
    hooks = [m.register_forward_hook(lambda m, a, out: found.append((tuple(a[0].shape), m)))
             for m in model.modules() if isinstance(m, ActiveShift2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    unique = {}
    for shape, m in found:  # one row per distinct (shape, stride)
        unique.setdefault((shape, m.stride), (shape, m))
    return list(unique.values())


def custom_op_model(layer, shape, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    N, C, H, W = shape
    out = layer(torch.zeros(shape)).shape
    node = helper.make_node("ActiveShift", ["input", "shift"], ["output"], domain="ai.onnx.contrib",
                            strides=f"{layer.stride[0]},{layer.stride[1]}", pads=f"{layer.padding[0]},{layer.padding[1]}")
    graph = helper.make_graph([node], "active_shift", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out))],
                              [numpy_helper.from_array(layer.shift.detach().float().numpy(), "shift")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.contrib", 1)]), path)


def identity_model(shape, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    v = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape))  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity", [v("input")], [v("output")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def standard_model(layer, shape, form: str, path: Path) -> None:
    from asl_cli.export import OPSET, export_form

    m = export_form(torch.nn.Sequential(layer).eval(), shape, form)
    torch.onnx.export(m, (torch.randn(shape),), str(path), input_names=["input"], output_names=["output"],
                      opset_version=OPSET, dynamo=True, verbose=False)


def register_custom_op():
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type="ActiveShift", inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
             attrs={"strides": PyCustomOpDef.dt_string, "pads": PyCustomOpDef.dt_string})
    def active_shift(x, shift, **attrs):
        stride = [int(v) for v in attrs["strides"].split(",")]
        padding = [int(v) for v in attrs["pads"].split(",")]
        return torch.ops.asl.active_shift(torch.from_numpy(x), torch.from_numpy(shift), stride, padding).numpy()


def ort_session(path: Path, threads: int, custom: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if custom:
        from onnxruntime_extensions import get_library_path

        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="as_resnet_w32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--csv", type=Path, default=Path("results/ort_custom_op.csv"))
    a = p.parse_args(argv)
    try:
        import onnxruntime
        import onnxruntime_extensions  # noqa: F401
    except ImportError as e:
        sys.exit(f"needs the deploy extra and onnxruntime-extensions ({e.name} is missing): "
                 "pip install 'asl-cli[deploy]' onnxruntime-extensions")
    from asl_cli.experiments.bench import append_csv, median_ms, provenance

    torch.set_num_threads(a.threads)
    register_custom_op()
    prov = provenance("cpu", a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, layer in shift_layers_of(a.model):
            x = torch.randn(shape)
            feed = {"input": x.numpy()}
            kernel_ms = median_ms(lambda: layer(x), a.threads, a.min_run_time)
            ref = layer(x).detach().numpy()
            row = {"model": a.model, "shape": "x".join(map(str, shape)), "stride": layer.stride[0], "kernel_ms": round(kernel_ms, 4)}
            for form in ("identity", "conv", "slice", "custom_op"):
                path = Path(tmp) / f"{form}.onnx"
                if form == "identity":
                    identity_model(shape, path)
                elif form == "custom_op":
                    custom_op_model(layer, shape, path)
                else:
                    standard_model(layer, shape, form, path)
                sess = ort_session(path, a.threads, custom=form == "custom_op")
                got = sess.run(None, feed)[0]
                if form != "identity":
                    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
                    if err > 1e-4:
                        sys.exit(f"{form} at {row['shape']} differs from the kernel by {err:.2e} of its scale")
                ms = median_ms(lambda: sess.run(None, feed), a.threads, a.min_run_time)
                row[f"{form}_ms"] = round(ms, 4)
                row[f"{form}_vs_kernel"] = round(ms / kernel_ms, 2)
            rows.append({**row, "onnxruntime": onnxruntime.__version__,
                         "onnxruntime_extensions": onnxruntime_extensions.__version__, **prov})
            print(f"{row['shape']} stride {row['stride']}: kernel {kernel_ms:.3f} ms; in ONNX Runtime: identity "
                  f"{row['identity_ms']:.3f}, conv {row['conv_ms']:.3f}, slice {row['slice_ms']:.3f}, custom op {row['custom_op_ms']:.3f} ms "
                  f"(custom op / conv form {row['custom_op_ms'] / row['conv_ms']:.2f}x)", flush=True)
    append_csv(rows, a.csv)
    print(f"appended {len(rows)} rows to {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
