"""The four usage lines users were promised, run exactly as written in an empty folder, in the
order a new user would: train, look at its shifts, ablate one variant, time a layer."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import HANG_GUARD_S

ASL = str(Path(sys.executable).with_name("asl"))  # the installed console script, as a user runs it


def run(cwd: Path, *line: str) -> str:
    res = subprocess.run(list(line), cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 0, f"{' '.join(line)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_the_four_card_lines_run_as_written(tmp_path):
    out = run(tmp_path, ASL, "train")
    assert "best test top1" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.pt").exists()

    out = run(tmp_path, ASL, "plot-shifts")
    assert run_dir.name in out
    assert (tmp_path / "results" / "shifts" / run_dir.name / "shifts.png").exists()

    run(tmp_path, ASL, "ablate", "--variant", "SR")
    summary = pd.read_csv(tmp_path / "results" / "ablate_quick.csv")
    assert summary["variant"].tolist() == ["SR"] and summary["seeds"].tolist() == [1]

    out = run(tmp_path, ASL, "profile", "--layer", "dw3")
    layers = pd.read_csv(tmp_path / "results" / "profile_layers_cpu.csv")
    assert layers["layer"].tolist() == ["dw3"] and layers["ms"].iloc[0] > 0
