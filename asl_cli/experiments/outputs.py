"""Where a command may write a results file: a result committed to git is never replaced unless
the user says so; the new file is written beside it instead, and the caller says where."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def tracked_by_git(path: Path) -> bool:
    """Whether `path` is a file tracked by the git checkout it lies in (False without git)."""
    path = Path(path)
    if not path.is_file() or shutil.which("git") is None:
        return False
    try:
        res = subprocess.run(["git", "ls-files", "--error-unmatch", "--", path.name], cwd=path.parent,
                             capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


@dataclass
class Target:
    path: Path  # where to write
    note: str = ""  # what the user must be told ("" when nothing is replaced or redirected)


def writable(path: Path, overwrite: bool, flag: str = "--overwrite") -> Target:
    """Where to write a results file asked for at `path`. A file committed to git is kept: the new
    one goes beside it as <stem>.local<suffix> (unless `overwrite`). Replacing any other existing
    file is allowed, and said."""
    path = Path(path)
    if not path.exists():
        return Target(path)
    if tracked_by_git(path) and not overwrite:
        beside = path.with_name(f"{path.stem}.local{path.suffix}")
        return Target(beside, f"{path} is a committed result, so it was left as it is and this run's file is {beside} "
                              f"(pass {flag} to replace it, or choose another file)")
    return Target(path, f"replaced the earlier {path}")


def writable_dir(folder: Path, overwrite: bool, flag: str = "--overwrite") -> Target:
    """The same for a folder of output files: one that holds committed files is kept, and the new
    files go to <folder>.local beside it (unless `overwrite`)."""
    folder = Path(folder)
    if not folder.is_dir() or overwrite or shutil.which("git") is None:
        return Target(folder)
    try:
        res = subprocess.run(["git", "ls-files", "--", "."], cwd=folder, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return Target(folder)
    if res.returncode != 0 or not res.stdout.strip():
        return Target(folder)
    beside = folder.with_name(f"{folder.name}.local")
    return Target(beside, f"{folder} holds committed results, so it was left as it is and this run's files are in "
                          f"{beside} (pass {flag} to replace them, or choose another --out)")
