"""One writer per run directory: an exclusive lock held for the run's lifetime.

`run_dir/.lock` is locked with flock(2) and holds the holder's pid and host. The kernel drops the lock
when its holder dies (even by SIGKILL), so a lock that can be taken is free; if the file still names
another process, that run died without cleaning up and the lock is taken over with a message. A second
run on a locked directory stops with exit 2, naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from xtune.errors import XtuneError

LOCK = ".lock"
HELD_ENV = "XTUNE_RUN_LOCK_HELD"  # set by the launcher for the workers it starts: the lock is already held


class RunLocked(XtuneError):
    exit_code = 2


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another run ({holder or 'holder unknown'}); wait for it to end, "
                "stop it, or choose another train.work_dir") from None
        previous = _read(fd)
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        if previous and previous != me:
            print(f"note: took over the lock of {self.path.parent} from {previous}, which is no longer running",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # a clean end leaves no holder behind
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def lock_run_dir(run_dir: Path) -> RunLock | None:
    """The run's lock, or None when a launcher of this run already holds it for us."""
    if os.environ.get(HELD_ENV) == str(Path(run_dir).resolve()):
        return None
    return RunLock(run_dir).acquire()
