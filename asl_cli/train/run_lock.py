"""Ownership of a run folder: one training process at a time, for the run's whole life."""
from __future__ import annotations

import os
from pathlib import Path


from ..errors import RunFolderBusy


class RunLock:
    """An exclusive lock on `<run_dir>/.lock` (flock: released by the OS if the process dies, so a
    killed run never leaves the folder locked)."""

    def __init__(self, run_dir: Path | None = None):
        self.path = Path(run_dir) / ".lock" if run_dir is not None else None
        self.fd: int | None = None

    def acquire(self, run_dir: Path | None = None) -> "RunLock":
        """Locks `run_dir` (or the folder given at construction); RunFolderBusy if another process holds it."""
        if run_dir is not None:
            self.path = Path(run_dir) / ".lock"
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return self

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise RunFolderBusy(f"{self.path.parent} is in use by another training process"
                                    f"{f' (pid {holder})' if holder else ''}; wait for it, stop it, or choose another output.dir") from None
            try:  # the holder we waited for removes the file on release: lock the file that is there now
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file (while still holding it, so no one else can have locked that file)
        and drops the lock: a finished or stopped run leaves no .lock behind."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None
