"""`python -m torch.distributed.run`, minus its traceback when a worker already reported a user error.

`launch.spawn_workers` starts this instead of torchrun itself. A worker that stops on an XtuneError (a bad
data record, a damaged checkpoint, a failed save) writes its message to $XTUNE_WORKER_ERROR_FILE; torchrun
then kills the other ranks and raises ChildFailedError, whose traceback would bury that message. Here it
ends quietly instead and the launcher prints the worker's message; any other failure keeps torchrun's report.
A SIGTERM/SIGINT forwarded by `xtune` (the workers got it too, and stop after a checkpoint) also ends
quietly: torchrun turns it into a SignalException whose traceback is noise; the launcher says what happened.
"""

from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from xtune.launch.watchdog import die_with_parent


def _reported() -> bool:
    report = os.environ.get("XTUNE_WORKER_ERROR_FILE")
    return bool(report) and os.path.isfile(report)


class _QuietWhenReported(logging.Filter):
    """Drops torchrun's "failed (exitcode: 2) local_rank: 0 ..." error line once a worker reported its
    user error: the launcher prints that message, once, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not _reported()


def main() -> None:
    die_with_parent()  # the agent goes when `xtune` goes; its workers follow it (see watchdog.py)

    # The logger of torch 2.13's elastic process context (it logs each failed worker before raising).
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietWhenReported())
    try:
        torchrun()
    except ChildFailedError:
        if _reported():
            sys.exit(1)
        raise
    except SignalException as e:
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
