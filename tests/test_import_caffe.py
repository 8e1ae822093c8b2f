"""The authors' trained AS-ResNet-w32: import, predictions on real photos, kernel agreement."""
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import asl_cli.nn.shift as asl_shift
from asl_cli.train import checkpoint as ckpt_io
from asl_cli.experiments.caffe.reader import CaffeFormatError
from asl_cli.cli import app
from asl_cli.experiments.caffe.importer import CaffeMismatch, import_model, to_checkpoint
from asl_cli.ops import reference_active_shift

SHARED = Path(os.environ.get("ASL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODEL = SHARED / "data" / "as-resnet-w32" / "AS-ResNet-w32_iter_450360.caffemodel"
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"the authors' model is not at {MODEL} (it is in their public repository "
                                "jyh2986/Active-Shift, models/ASL_Model/ImageNet/test_model/w32/; set ASL_SHARED to the folder above data/)")

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    model, report = import_model(MODEL)
    path = to_checkpoint(model, report, tmp_path_factory.mktemp("ck") / "w32.pt")
    return model, report, path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name, arr in (("chelsea", skdata.chelsea()), ("coffee", skdata.coffee())):
        out[name] = d / f"{name}.png"
        Image.fromarray(arr).save(out[name])
    return out


def test_every_stored_value_is_accounted_for(imported):
    _, r, _ = imported
    assert r["values"] == 909_035
    assert (r["values_conv"], r["values_fc"], r["values_shift"], r["values_scale"], r["values_stale_bn"]) == (632_672, 257_000, 3_840, 7_744, 7_779)
    assert r["arch"] == "as_resnet_w32"


def test_predictions_on_real_photos(imported, photos):
    runner = CliRunner()
    _, _, path = imported
    res = runner.invoke(app, ["predict", str(path), str(photos["chelsea"]), str(photos["coffee"]), "--json", "--topk", "3"])
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads(res.output)
    assert rows[0]["top"][0]["class"] in CAT_CLASSES
    assert rows[1]["top"][0]["class"] == "espresso"
    res = runner.invoke(app, ["predict", str(path), str(photos["chelsea"])])
    assert res.exit_code == 0 and "Egyptian cat" in res.output


def test_compiled_kernel_and_reference_give_the_same_logits(imported, photos, monkeypatch):
    from asl_cli.data.preprocess import load_image, to_input

    model, _, path = imported
    x = torch.cat([to_input(load_image(p), ckpt_io.load(path)["preprocessing"]) for p in photos.values()])
    with torch.no_grad():
        compiled = model(x)
        monkeypatch.setattr(asl_shift, "active_shift", reference_active_shift)
        reference = model(x)
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)
    if torch.cuda.is_available():
        monkeypatch.undo()
        with torch.no_grad():
            cuda = model.cuda()(x.cuda()).cpu()
        model.cpu()
        torch.testing.assert_close(cuda, compiled, atol=1e-3, rtol=1e-3)


def test_checkpoint_round_trip_and_fine_tune(imported, tmp_path):
    _, _, path = imported
    ck = ckpt_io.load(path)
    assert ck["preprocessing"]["kind"] == "caffe" and ck["source"]["values"] == 909_035
    m = ckpt_io.build_model(ck)
    assert len(ck["shifts"]) == 17
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ck["model_state"].items())


def test_wrong_width_and_broken_files(tmp_path):
    with pytest.raises(CaffeMismatch, match="use --arch as_resnet_w32"):
        import_model(MODEL, "as_resnet_w50")
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes(MODEL.read_bytes()[:100_000])
    with pytest.raises((CaffeFormatError, CaffeMismatch)):
        import_model(truncated)
    with pytest.raises(CaffeFormatError, match="not a readable Caffe model"):
        import_model(MODEL.parent / "LICENSE")
    res = CliRunner().invoke(app, ["import-caffe", str(truncated), "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_imported_model_evaluates_on_an_imagefolder_and_fine_tunes(imported, photos, tmp_path):
    """The caffe preprocessing path through `asl eval` on an ImageFolder, and --init-from with a
    new classifier (the synthetic task has 10 classes, the checkpoint 1000)."""
    import shutil

    _, _, path = imported
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for name, photo in photos.items():
            (root / split / name).mkdir(parents=True)
            shutil.copy(photo, root / split / name / "a.png")
    csv = tmp_path / "eval.csv"
    res = CliRunner().invoke(app, ["eval", str(path), f"data.root={root}", "data.workers=0", "--no-latency", "--csv", str(csv)])
    assert res.exit_code == 0, res.output
    import pandas as pd

    row = pd.read_csv(csv).iloc[0]
    assert row["dataset"] == "imagenet" and row["params"] == 901_256 and 0 <= row["top1"] <= 100

    from asl_cli.config import load_config
    from asl_cli.train import train

    tiny = ["model.name=as_resnet_w32", "data.train_size=16", "data.test_size=8", "train.batch_size=8", "train.iterations=1",
            "train.eval_batch_size=8", f"output.dir={tmp_path / 'ft'}"]
    with pytest.raises(ckpt_io.CheckpointError, match="init_skip_mismatched"):
        train(load_config("quick", tiny), init_from=path)
    with pytest.warns(UserWarning, match="fc.weight"):
        out = train(load_config("quick", tiny + ["train.init_skip_mismatched=true", f"output.dir={tmp_path / 'ft2'}"]), init_from=path)
    assert out["steps"] == 1


def test_unwritable_out_leaves_no_temp_file(imported, tmp_path):
    model, report, _ = imported
    target = tmp_path / "a_folder"
    target.mkdir()
    with pytest.raises(OSError):
        to_checkpoint(model, report, target)  # a folder where the file should go
    assert list(tmp_path.rglob("*tmp*")) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["import-caffe", str(MODEL), "--out", str(blocker / "w32.pt")])
    assert res.exit_code == 1 and "Not a directory" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_inference_form_of_the_authors_w32_keeps_its_predictions(imported, photos):
    from asl_cli.inference import inference_form
    from asl_cli.data.preprocess import load_image, to_input

    model, _, path = imported
    prep = ckpt_io.load(path)["preprocessing"]
    fast = inference_form(model)
    with torch.no_grad():
        for name, cls, p in (("chelsea", 285, 0.680), ("coffee", 967, 0.906)):  # Egyptian cat, espresso
            x = to_input(load_image(photos[name]), prep)
            ref, out = model.eval()(x), fast(x)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            prob = torch.softmax(out, dim=1)[0]
            assert int(prob.argmax()) == cls and abs(float(prob[cls]) - p) < 0.0015, (name, float(prob[cls]))
