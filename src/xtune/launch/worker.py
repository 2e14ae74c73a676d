"""One training process started by torch.distributed.run: reads the run dir's config.yaml and trains."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xtune.config.io import spec_from_yaml
from xtune.errors import XtuneError
from xtune.launch.env import launch_env
from xtune.launch.watchdog import die_with_parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xtune.launch.worker")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--config", default=None, help="the spec of this launch (default: WORK_DIR/config.yaml)")
    args = parser.parse_args(argv)
    die_with_parent()  # a worker never outlives its torchrun agent

    # Lazy, after the watchdog runs: the seconds spent importing torch and the engine (methods) would otherwise be a
    # window in which the launcher's death goes unnoticed (a parent gone before die_with_parent is not watched).
    from xtune.methods import train

    run_dir = Path(args.work_dir)
    try:
        train(spec_from_yaml(args.config or run_dir / "config.yaml"), run_dir)
    except XtuneError as e:
        report = os.environ.get("XTUNE_WORKER_ERROR_FILE")
        if report:
            # Started by `xtune` itself: the first rank to fail hands its message to the launcher, which
            # prints it once (rank 0 may be killed by torchrun before it gets to print anything).
            _report_error(Path(report), e)
        elif launch_env().rank == 0:
            # Every rank hits the same user error; one message is enough.
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


def _report_error(path: Path, error) -> None:
    """Write {exit_code, message} to `path` unless another rank already did (first one wins)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"exit_code": error.exit_code, "message": str(error)}, f)


def _exit(code: int) -> None:
    # Everything is saved and the process group is destroyed by now. A plain interpreter exit then
    # sometimes aborts in a C++ destructor of torch.distributed's background threads ("terminate called
    # without an active exception", ~1 run in 6 with gloo on CPU), which torchrun reports as a failed
    # run; leaving with os._exit skips those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
