"""What a non-editable install gets, and where commands write."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from asl_cli.cli import app
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_wheel_lists_every_subpackage_and_the_recipes():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = cfg["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asl_cli").rglob("__init__.py")}
    assert found <= set(st["packages"]), found - set(st["packages"])
    assert st["package-dir"]["asl_cli.recipes"] == "recipes" and "*.yaml" in st["package-data"]["asl_cli.recipes"]
    assert (ROOT / "LICENSE").exists() and cfg["project"]["license"] == "BSD-3-Clause"
    # SPDX license strings need setuptools >= 77
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in cfg["build-system"]["requires"])


def test_operator_needs_only_torch():
    code = ("import sys, asl_cli.nn, asl_cli.ops\n"
            "bad = [m for m in ('pandas', 'typer', 'rich', 'matplotlib', 'yaml') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr


def test_outputs_land_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "results").rglob("*") if p.is_file()}
    res = runner.invoke(app, ["profile", "layers", "asl", "--shape", "1x4x8x8", "--min-run-time", "0.02"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "results" / "profile_layers_cpu.csv")) == 1
    tiny = ["data.train_size=64", "data.test_size=32", "train.batch_size=32", "train.iterations=2", "train.eval_every=2"]
    res = runner.invoke(app, ["ablate", "quick", *tiny, "--variant", "TR"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results" / "ablate_quick.csv").exists() and (tmp_path / "runs" / "ablate-quick" / "TR-seed0").is_dir()
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "results").rglob("*") if p.is_file()}
    assert after == before, "a command wrote into the source tree's results/"


def test_no_source_file_is_ignored_by_git():
    # an ignore pattern such as `data/` would also drop a package folder of that name from every clone
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for d in ("asl_cli", "ext", "recipes", "tests", "scripts") for p in (ROOT / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")]
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == [], out.stdout
