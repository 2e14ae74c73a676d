"""Start a run: in this process, under an external torchrun/Slurm, or by spawning N workers.

nproc_per_node > 1 and not launched yet  ->  torch's elastic agent in this process (torchrun --standalone
--nproc-per-node N): python -m xtune.launch.worker --work-dir W
RANK/WORLD_SIZE (torchrun) or SLURM_*     ->  join that process group and train
otherwise                                 ->  train in this process (a 1-rank group, no ports)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from xtune.checkpoint.dcp import resolve_resume
from xtune.config.schema import RunSpec
from xtune.engine.preflight import preflight
from xtune.errors import CheckpointError, XtuneError
from xtune.launch.env import launch_env
from xtune.launch.rundir import write_run_files
from xtune.launch.runlock import HELD_ENV, lock_run_dir
from xtune.launch.torchrun import run_agent
from xtune.launch.watchdog import die_with_parent
from xtune.methods import train
from xtune.models import get_adapter


def run(spec: RunSpec, work_dir, argv=None) -> int:
    """Returns the exit code (0: success). User errors are raised (XtuneError) before anything starts.
    `argv` (the command line as typed) goes to the run dir's cmd.txt."""
    run_dir = Path(work_dir).expanduser().resolve()
    env = launch_env()
    nproc = spec.parallel.nproc_per_node
    if env.launched:
        die_with_parent()  # one rank of an external torchrun/srun: stop when its agent dies
    elif nproc > 1:
        preflight(spec, get_adapter(spec.model), run_dir)
        lock = lock_run_dir(run_dir)  # before any file is written: a refused second run writes nothing
        try:
            config = write_run_files(spec, run_dir, argv)  # before the workers start: they read it
            return spawn_workers(nproc, run_dir, lock, config)
        finally:
            if lock is not None:
                lock.release()
    train(spec, run_dir, argv=argv)
    return 0


def spawn_workers(nproc: int, run_dir: Path, lock=None, config: Path | None = None) -> int:
    """Start `nproc` workers through torch's elastic agent in this process (launch/torchrun.py) and wait for
    them. SIGTERM/SIGINT reach the workers through the agent; they finish the step, save and exit."""
    args = ["-m", "xtune.launch.worker", "--work-dir", str(run_dir)]
    if config is not None:
        args += ["--config", str(config)]
    report = run_dir / ".worker-error.json"
    report.unlink(missing_ok=True)
    env = {"XTUNE_WORKER_ERROR_FILE": str(report)}
    # torchrun would set 1 anyway, with a warning; say it explicitly.
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if lock is not None:
        # This process holds the run lock until the last worker is gone; the workers know it is held for them.
        env[HELD_ENV] = str(run_dir)
    before = _latest(run_dir)
    code = run_agent(nproc, args, env, str(report), sys.executable)
    if code > 128 and _latest(run_dir) not in (None, before):
        # The agent reports the signal as a failure; the workers stopped cleanly with a checkpoint.
        ckpt = _latest(run_dir)
        print(f"stopped by signal {code - 128}: checkpoint saved; continue with train.resume={ckpt}",
              file=sys.stderr, flush=True)
        return 0
    if code and report.is_file():
        _raise_worker_error(report)
    return code


def _raise_worker_error(report: Path) -> None:
    """A worker's user error (its message and exit code), raised here so the CLI prints it as usual."""
    try:
        data = json.loads(report.read_text())
        report.unlink()
    except (OSError, ValueError):
        return
    error = XtuneError(str(data.get("message", "a worker failed")))
    error.exit_code = int(data.get("exit_code", 2))
    raise error


def _latest(run_dir: Path):
    try:
        return resolve_resume("auto", run_dir)
    except CheckpointError:
        return None
