"""ONNX export: the shift in standard operators equals the operator, every model family runs in
ONNX Runtime with PyTorch's logits, the file passes onnx.checker, and what cannot be exported says so."""
import sys

import pytest
import torch
from typer.testing import CliRunner

from asl_cli.cli import app
from asl_cli.export import SHIFT_FORMS, ExportError, StandardShift2d, export_form
from asl_cli.ops import active_shift
from asl_cli.zoo import create_model

from test_import_caffe import MODEL, photos  # noqa: F401  (the real photos fixture)


def randomise(model: torch.nn.Module, shift_scale: float = 3.0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and shifts that reach a few pixels, as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            shift = getattr(m, "shift", None)
            if isinstance(shift, torch.Tensor) and shift.is_floating_point() and type(m).__name__ == "ActiveShift2d":
                shift.mul_(shift_scale)
    return model.eval()


@pytest.mark.parametrize("form", SHIFT_FORMS)
@pytest.mark.parametrize("shape, stride, padding, scale", [((2, 5, 7, 9), 1, 0, 1.0), ((2, 6, 8, 8), 2, 0, 2.5),
                                                           ((1, 4, 9, 6), 2, 1, 4.0), ((2, 3, 5, 5), 1, 1, 9.0),
                                                           ((1, 8, 11, 4), (2, 1), (0, 1), 1.5)])
def test_the_standard_shift_equals_the_operator(form, shape, stride, padding, scale):
    x = torch.randn(shape)
    s = (torch.rand(shape[1], 2) * 2 - 1) * scale
    st = (stride, stride) if isinstance(stride, int) else stride
    pd = (padding, padding) if isinstance(padding, int) else padding
    layer = StandardShift2d(s, st, pd, shape[-2:], form)
    torch.testing.assert_close(layer(x), active_shift(x, s, st, pd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", SHIFT_FORMS)
def test_integer_shifts_are_pure_slices(form):
    x = torch.randn(2, 9, 8, 10)
    s = torch.randint(-3, 4, (9, 2)).float()
    layer = StandardShift2d(s, (2, 2), (0, 0), (8, 10), form)
    assert torch.equal(layer(x), active_shift(x, s, 2, 0))


def test_a_non_finite_shift_cannot_be_exported():
    s = torch.zeros(4, 2)
    s[1, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        StandardShift2d(s, (1, 1), (0, 0), (8, 8))


def test_an_input_of_another_size_is_refused():
    layer = StandardShift2d(torch.zeros(3, 2), (1, 1), (0, 0), (8, 8))
    with pytest.raises(ExportError, match="8x8"):
        layer(torch.randn(1, 3, 9, 9))


def test_the_export_form_folds_batchnorm_and_keeps_the_logits():
    model = randomise(create_model("asnet20_16x1", spatial="dw3_bn"))
    m = export_form(model, (1, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), rtol=1e-4, atol=1e-5)
    folded = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert folded < sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in model.modules())


onnx = pytest.importorskip("onnx", reason="the deploy extra (onnx, onnxruntime, onnxscript) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")


def run_onnx(path, x):
    from asl_cli.experiments.evaluation.deploy import session

    return torch.from_numpy(session(path).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name, overrides, forms", [
    ("asnet20_16x1", {}, SHIFT_FORMS),                          # ASNet, learned shifts
    ("asnet20_16x1", {"shift_mode": "GS"}, ("conv",)),           # integer shifts
    ("asnet20_16x1", {"spatial": "dw3_bn"}, ("conv",)),          # the depthwise peer
    ("shiftresnet20_x3", {}, ("conv",)),                         # ShiftNet's grouped shift
    ("as_resnet_w32", {}, ("conv",)),                            # AS-ResNet, stride-2 shifts, 224x224
    ("mobilenet_v2_x0.5", {}, ("conv",)),                        # the MobileNetV2 peer
])
def test_every_family_runs_in_onnx_runtime_with_pytorchs_logits(tmp_path, name, overrides, forms):
    from asl_cli.export import export_onnx
    from asl_cli.zoo import get_entry

    model = randomise(create_model(name, **overrides))
    s = get_entry(name).input_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = model(x)
    for form in forms:
        info = export_onnx(model, tmp_path / f"{form}.onnx", (1, 3, s, s), form)
        proto = onnx.load(info["path"])
        onnx.checker.check_model(proto, full_check=True)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard operators only
        got = run_onnx(info["path"], x)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (name, form)


def test_asl_export_writes_a_checked_file_with_its_model_in_the_metadata(tmp_path):
    res = CliRunner().invoke(app, ["export", "asnet20_16x1", "--out", str(tmp_path / "a.onnx")])
    assert res.exit_code == 0, res.output
    assert "within 1e-4" in res.output
    from asl_cli.experiments.evaluation.deploy import onnx_metadata

    meta = onnx_metadata(tmp_path / "a.onnx")
    assert meta["asl.model"] == "asnet20_16x1" and meta["asl.input_size"] == "32" and meta["asl.shift_form"] == "conv"


@pytest.mark.parametrize("args, message", [(["no_such_model"], "unknown model"), (["asnet20_16x1", "--format", "tflite"], "--format"),
                                           (["asnet20_16x1", "--shift-form", "grid"], "--shift-form")])
def test_asl_export_refuses_bad_arguments(tmp_path, args, message):
    res = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and message in res.output


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["export", str(bad), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_without_the_deploy_extra_export_exits_2_with_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    res = CliRunner().invoke(app, ["export", "asnet20_16x1", "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "pip install 'asl-cli[deploy]'" in res.output


def test_onnx_runtime_profile_writes_rows_for_both_shift_forms(tmp_path):
    csv = tmp_path / "ort.csv"
    res = CliRunner().invoke(app, ["profile", "models", "asnet20_16x1", "--runtime", "onnxruntime", "--min-run-time", "0.05",
                                   "--batch", "2", "--out", str(csv)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    rows = pd.read_csv(csv)
    assert sorted(rows["shift_form"]) == sorted(SHIFT_FORMS) and rows["fastest"].sum() == 1
    assert (rows["cpu_ms_batch1"] > 0).all() and rows["runtime"].str.startswith("onnxruntime").all()


@pytest.mark.skipif(not MODEL.exists(), reason=f"the authors' model is not at {MODEL}")
def test_the_authors_w32_in_onnx_runtime_still_sees_the_cat(tmp_path, photos):  # noqa: F811
    from asl_cli.data.preprocess import load_image, to_input
    from asl_cli.experiments.caffe.importer import import_model, to_checkpoint
    from asl_cli.train import checkpoint as ckpt_io

    model, report = import_model(MODEL)
    ck = to_checkpoint(model, report, tmp_path / "w32.pt")
    res = CliRunner().invoke(app, ["export", str(ck), "--out", str(tmp_path / "w32.onnx")])
    assert res.exit_code == 0, res.output
    x = to_input(load_image(photos["chelsea"]), ckpt_io.load(ck)["preprocessing"])
    with torch.no_grad():
        ref = model.eval()(x)
    got = run_onnx(tmp_path / "w32.onnx", x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    p = torch.softmax(got, 1)[0]
    assert p.argmax().item() == 285 and round(p.max().item(), 3) == 0.680  # Egyptian cat
    import json

    res = CliRunner().invoke(app, ["predict", str(tmp_path / "w32.onnx"), str(photos["chelsea"]), "--runtime", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    top = json.loads(res.output)[0]["top"][0]
    assert top["class"] == "Egyptian cat" and round(top["probability"], 3) == 0.680


def test_an_onnx_file_needs_the_onnx_runtime(tmp_path):
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "m.onnx"), str(tmp_path / "cat.png")])
    assert res.exit_code == 2 and "--runtime onnxruntime" in res.output


def test_eval_in_onnx_runtime_gives_pytorchs_accuracy(tmp_path):
    import pandas as pd

    run = tmp_path / "run"
    tiny = ["data.train_size=128", "data.test_size=64", "train.batch_size=32", "train.iterations=8", "train.eval_every=8",
            "train.ckpt_every=8", "train.compile=false"]
    res = CliRunner().invoke(app, ["train", "quick", *tiny, f"output.dir={run}"])
    assert res.exit_code == 0, res.output
    csv = tmp_path / "eval.csv"
    for runtime in ("torch", "onnxruntime"):
        res = CliRunner().invoke(app, ["eval", str(run), "--runtime", runtime, "--csv", str(csv)])
        assert res.exit_code == 0, res.output
    torch_row, ort_row = pd.read_csv(csv).to_dict("records")
    assert ort_row["runtime"].startswith("onnxruntime") and torch_row["runtime"] == "torch"
    assert abs(ort_row["loss"] - torch_row["loss"]) <= 1e-4 * abs(torch_row["loss"])
    assert abs(ort_row["top1"] - torch_row["top1"]) <= 100 / 64 + 1e-9  # at most one near-tie image
    assert ort_row["cpu_ms_batch1"] > 0
    res = CliRunner().invoke(app, ["eval", str(run), "--runtime", "onnxruntime", "--form", "inference"])
    assert res.exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", __import__("asl_cli.zoo", fromlist=["list_models"]).list_models())
def test_every_zoo_model_exports_and_runs_in_onnx_runtime(tmp_path, name):
    from asl_cli.export import export_onnx
    from asl_cli.zoo import get_entry

    torch.manual_seed(0)
    model = randomise(create_model(name))
    s = get_entry(name).input_size
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        ref = model(x)
    info = export_onnx(model, tmp_path / "m.onnx", (1, 3, s, s))
    got = run_onnx(info["path"], x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_the_custom_operator_benchmark_names_what_it_needs(monkeypatch):
    """scripts/ort_custom_op.py needs onnxruntime-extensions beyond the deploy extra: without it,
    it stops before any work with the pip line."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "ort_custom_op.py"
    spec = importlib.util.spec_from_file_location("ort_custom_op", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        script.main(["--csv", "never-written.csv"])
    assert "is missing" in str(e.value) and "pip install 'asl-cli[deploy]' onnxruntime-extensions" in str(e.value)
