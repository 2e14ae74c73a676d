"""Start a run: in this process, under an external torchrun/Slurm, or by spawning N workers.

    nproc_per_node > 1 and not launched yet  ->  python -m torch.distributed.run --standalone
                                                 --nproc-per-node N -m xtune.launch.worker --work-dir W
    RANK/WORLD_SIZE (torchrun) or SLURM_*     ->  join that process group and train
    otherwise                                 ->  train in this process (a 1-rank group, no ports)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from xtune.config.schema import RunSpec


def run(spec: RunSpec, work_dir, argv=None) -> int:
    """Returns the exit code (0: success). User errors are raised (XtuneError) before anything starts.
    `argv` (the command line as typed) goes to the run dir's cmd.txt."""
    from xtune.launch.rundir import write_run_files
    from xtune.launch.runlock import lock_run_dir
    from xtune.engine.trainer import preflight
    from xtune.methods import train
    from xtune.launch.watchdog import die_with_parent
    from xtune.launch.env import launch_env

    run_dir = Path(work_dir).expanduser().resolve()
    env = launch_env()
    nproc = spec.parallel.nproc_per_node
    if env.launched:
        die_with_parent()  # one rank of an external torchrun/srun: stop when its agent dies
    elif nproc > 1:
        from xtune.models import get_adapter

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
    # xtune.launch.torchrun is torch.distributed.run that stays quiet when a worker reported a user error.
    cmd = [sys.executable, "-m", "xtune.launch.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "xtune.launch.worker", "--work-dir", str(run_dir)]
    if config is not None:
        cmd += ["--config", str(config)]
    env = dict(os.environ)
    report = run_dir / ".worker-error.json"
    report.unlink(missing_ok=True)
    env["XTUNE_WORKER_ERROR_FILE"] = str(report)
    # torchrun would set 1 anyway, with a warning; say it explicitly.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    fds = ()
    if lock is not None:
        # torchrun inherits the lock (it stays held until the last process of the run is gone) and the
        # workers know it is held for them.
        from xtune.launch.runlock import HELD_ENV

        env[HELD_ENV] = str(run_dir)
        fds = (lock.fd,)
    proc = subprocess.Popen(cmd, env=env, pass_fds=fds)
    stopped = []

    # Forward SIGTERM/SIGINT to torchrun, which passes them on to the workers; they finish the
    # step, save a checkpoint and exit. We keep waiting instead of dying (and orphaning them).
    def forward(signum, frame):
        stopped.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    before = _latest(run_dir)
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code and stopped and _latest(run_dir) not in (None, before):
        # torchrun reports its own signal as a failure; the workers stopped cleanly with a checkpoint.
        ckpt = _latest(run_dir)
        print(f"stopped by signal {stopped[0]}: checkpoint saved; continue with train.resume={ckpt}",
              file=sys.stderr, flush=True)
        return 0
    if code and report.is_file():
        _raise_worker_error(report)
    return code


def _raise_worker_error(report: Path) -> None:
    """A worker's user error (its message and exit code), raised here so the CLI prints it as usual."""
    import json

    from xtune.errors import XtuneError

    try:
        data = json.loads(report.read_text())
        report.unlink()
    except (OSError, ValueError):
        return
    error = XtuneError(str(data.get("message", "a worker failed")))
    error.exit_code = int(data.get("exit_code", 2))
    raise error


def _latest(run_dir: Path):
    from xtune.checkpoint.dcp import resolve_resume
    from xtune.errors import CheckpointError

    try:
        return resolve_resume("auto", run_dir)
    except CheckpointError:
        return None
