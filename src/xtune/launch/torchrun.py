"""torch's elastic agent, run inside the `xtune` process: `torch.distributed.run --standalone` without a
second interpreter (the agent no longer costs its own Python start and torch import).

`run_agent` starts `nproc` workers through the public `torch.distributed.launcher.api.elastic_launch`, with
the rendezvous `torchrun --standalone` uses (c10d on localhost, a free port, a fresh run id), and turns its
two ways of ending into an exit code instead of a traceback:
  - ChildFailedError: a worker failed. When it reported a user error ($XTUNE_WORKER_ERROR_FILE) the
    launcher prints that message once, so the agent's own "failed (exitcode ...)" line is dropped.
  - SignalException: SIGTERM/SIGINT reached this process; the agent has passed it on to the workers (they
    finish the step and save a checkpoint) and waited for them; the code is 128 + the signal.
The workers are children of this process: their watchdog (watchdog.py) stops them when it dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from collections.abc import Iterator, Sequence

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

# The logger of torch 2.13's elastic process context (it logs each failed worker before raising).
_PCONTEXT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class _QuietWhenReported(logging.Filter):
    """Drops the agent's "failed (exitcode: 2) local_rank: 0 ..." error line once a worker reported its
    user error: the launcher prints that message, once, and nothing else."""

    def __init__(self, report: str) -> None:
        super().__init__()
        self.report = report

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not os.path.isfile(self.report)


def _raise_signal(signum: int, frame: object) -> None:
    raise SignalException(f"received signal {signum}", sigval=signal.Signals(signum))


@contextlib.contextmanager
def _launch_scope(env: dict[str, str], report: str) -> Iterator[None]:
    """The workers' environment (they inherit this process's), the quiet filter and this process's signal
    handlers, all as they were once the launch is over. Until the agent installs its own handlers (when the
    workers start) a signal ends the launch the same way: SignalException."""
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    quiet = _QuietWhenReported(report)
    logging.getLogger(_PCONTEXT_LOGGER).addFilter(quiet)
    old_handlers = {s: signal.signal(s, _raise_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        logging.getLogger(_PCONTEXT_LOGGER).removeFilter(quiet)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_agent(nproc: int, args: Sequence[str], env: dict[str, str], report: str, executable: str) -> int:
    """`executable ARGS` on `nproc` local ranks; 0, the signal's 128 + N, or 1 when a worker failed
    (its report, if it wrote one, is read by the caller)."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    with _launch_scope(env, report):
        try:
            elastic_launch(config, executable)(*args)
        except ChildFailedError:
            return 1
        except SignalException as e:
            return 128 + int(e.sigval)
    return 0
