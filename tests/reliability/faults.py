"""Run the real `xtune` command line in this process with one fault injected at the OS boundary.

    XTUNE_FAULT=kill-before-marker:K  python tests/reliability/faults.py sft ...
        SIGKILL this process while checkpoint K is being written: its DCP shards and per-rank state are on
        disk in checkpoints/.tmp-step-K, its completion marker (meta.json) is not (the last file a save writes).
    XTUNE_FAULT=kill-in-async-write:K  python tests/reliability/faults.py sft ... train.async_save=true
        SIGKILL this process while checkpoint K is written in the background: its shard writer (in DCP's
        background thread) waits until training has finished step K + 1, says so on stderr, then kills.
    XTUNE_FAULT=enospc:K:BYTES  python tests/reliability/faults.py sft ...
        The disk fills up while checkpoint K is written: writes to its DCP shard files fail with
        OSError(ENOSPC) once BYTES bytes have gone to them (the bytes before that land on disk).

Nothing else changes: the same CLI, config, model, data and engine as `python -m xtune`. Only single-process
runs (the faults are installed in this interpreter, not in workers started by torchrun).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def kill_before_marker(step: int) -> None:
    from xtune.checkpoint import integrity

    real = integrity.write_atomic

    def write_atomic(path, text):
        path = Path(path)
        if path.name == integrity.MARKER and path.parent.name == f".tmp-step-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, text)

    integrity.write_atomic = write_atomic


def kill_in_async_write(step: int) -> None:
    import threading

    from torch.distributed.checkpoint.filesystem import FileSystem

    from xtune.engine.trainer import Trainer

    real_step, real_stream = Trainer.train_step, FileSystem.create_stream
    trained = threading.Event()

    def train_step(self, micro):
        rec = real_step(self, micro)
        if self.step >= step + 1:
            trained.set()
        return rec

    @contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and f".tmp-step-{step}" in Path(path).parts and threading.current_thread() is not \
                threading.main_thread() and trained.wait(120):
            print(f"fault: step {step + 1} trained while checkpoint {step} was being written; SIGKILL",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        with real_stream(self, path, mode) as stream:
            yield stream

    Trainer.train_step = train_step
    FileSystem.create_stream = create_stream


class _FillingStream:
    """A file whose writes fail with ENOSPC once the shared byte budget is spent (partial write first)."""

    def __init__(self, stream, budget: list):
        self._stream, self._budget = stream, budget

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self._budget[0]:
            if self._budget[0] > 0:
                self._stream.write(memoryview(data).cast("B")[: self._budget[0]])
                self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def enospc(step: int, budget_bytes: int) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream
    budget = [budget_bytes]

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            if "w" in mode and f".tmp-step-{step}" in Path(path).parts:
                yield _FillingStream(stream, budget)
            else:
                yield stream

    FileSystem.create_stream = create_stream


def main() -> None:
    kind, *args = os.environ.get("XTUNE_FAULT", "none").split(":")
    if kind == "kill-before-marker":
        kill_before_marker(int(args[0]))
    elif kind == "kill-in-async-write":
        kill_in_async_write(int(args[0]))
    elif kind == "enospc":
        enospc(int(args[0]), int(args[1]))
    elif kind != "none":
        raise SystemExit(f"unknown XTUNE_FAULT {kind!r}")
    from xtune.cli import main as xtune_main

    sys.argv = ["xtune", *sys.argv[1:]]
    xtune_main()


if __name__ == "__main__":
    main()
