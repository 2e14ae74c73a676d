"""A dead launcher leaves no worker training, and one run at a time writes a run directory.

The user's path: `python -m xtune sft ... parallel.nproc_per_node=2` (xtune runs torch's elastic agent, which starts two
workers in their own sessions). SIGKILL of xtune's process group (xtune and the torchrun agent, as `kill -9`
or the OOM killer would) must take the workers down within seconds, after which nothing in the run directory
changes; while the run is alive, a second `xtune sft` on its directory exits 2 naming the holder.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.reliability.helpers import ROOT, env, run_args, start_logged, wait_for_step, xtune


def workers_of(run: Path) -> list:
    """Pids of the live worker processes of the run (not its torchrun agent, which names them too)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        line = b" ".join(cmd)
        if state != "Z" and str(run).encode() in line and b"xtune.launch.worker" in line \
                and b"xtune.launch.torchrun" not in line:
            pids.append(int(proc.name))
    return pids


def snapshot(run: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_sigkill_of_the_launcher_stops_every_worker_and_a_second_run_is_refused(workspace, tmp_path):
    run = tmp_path / "run"
    args = run_args(workspace["data"], workspace["cache"], run, "parallel.nproc_per_node=2", "train.global_batch_size=2",
                    "train.max_steps=100000", "train.save_every=5")
    log = tmp_path / "out.log"
    proc = start_logged(args, log)
    try:
        wait_for_step(run, proc, log, 3)
        assert len(workers_of(run)) == 2

        second = xtune(*args, timeout=90)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
        message = " ".join(second.stderr.split())
        assert f"{run} is in use by another run (pid {proc.pid} on {socket.gethostname()})" in message, message
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # xtune and its torchrun agent; the workers have their own sessions
        proc.wait()
    t0 = time.time()
    while workers_of(run) and time.time() - t0 < 10:
        time.sleep(0.1)
    orphans = workers_of(run)
    for pid in orphans:  # do not leave them running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived their launcher by 10 s"
    before = snapshot(run)
    time.sleep(2)
    assert snapshot(run) == before, "the run directory still changes after the workers are gone"


def test_stale_lock_is_taken_over_and_a_held_one_refused(tmp_path):
    """The lock of a run that died (its file still names it) is taken over with a message; one held by a live
    process (another interpreter holding the flock) is refused with exit code 2 naming it."""
    from xtune.launch.runlock import RunLock, RunLocked

    (tmp_path / ".lock").write_text("pid 4194303 on some-host\n")
    code = ("import sys; from xtune.launch.runlock import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        try:
            RunLock(tmp_path).acquire()
            raise AssertionError("a held lock was taken")
        except RunLocked as e:
            assert e.exit_code == 2 and f"pid {holder.pid} on {socket.gethostname()}" in str(e)
    finally:
        holder.stdin.close()
        err = holder.stderr.read()
        holder.wait(timeout=30)
    assert "took over the lock" in err and "pid 4194303 on some-host" in err, err
    # The holder ended without releasing (process exit): its lock is free and taken over in turn.
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().strip() == f"pid {os.getpid()} on {socket.gethostname()}"
    lock.release()
