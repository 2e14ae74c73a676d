"""SIGTERM to the `parallel.nproc_per_node` launcher (what a scheduler sends): it is forwarded to the
workers, which finish the step, save a checkpoint and exit; xtune exits 0 and the run resumes from it
(here on one rank: checkpoints reshard). The save is asynchronous (train.async_save): the workers wait for its
background write, marker and `latest` before they exit."""

import signal
import time

from tests.reliability.helpers import checkpoint_state, last_step, records, run_args, start_logged, wait_for_step, xtune
from tests.reliability.test_orphans_and_lock import workers_of


def test_sigterm_to_the_launcher_stops_cleanly_with_a_checkpoint_then_resumes(workspace, tmp_path):
    run = tmp_path / "run"
    args = run_args(workspace["data"], workspace["cache"], run, "parallel.nproc_per_node=2",
                    "train.global_batch_size=2", "train.max_steps=100000", "train.save_every=0",
                    "train.async_save=true")
    log = tmp_path / "out.log"
    proc = start_logged(args, log)
    try:
        wait_for_step(run, proc, log, 2)
        assert checkpoint_state(run)["complete"] == []  # save_every=0: only the stop can save
        proc.send_signal(signal.SIGTERM)  # the launcher alone, as `kill PID` or a scheduler does
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    stopped = last_step(run)
    state = checkpoint_state(run)
    assert state["complete"] == [stopped] and state["latest"] == f"step-{stopped}", (state, stopped)
    assert f"continue with train.resume={run / 'checkpoints' / f'step-{stopped}'}" in " ".join(text.split())
    assert "Traceback" not in text
    t0 = time.time()
    while workers_of(run) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not workers_of(run), "workers outlived the stop"

    resumed = xtune(*run_args(workspace["data"], workspace["cache"], run, "train.global_batch_size=2",
                              f"train.max_steps={stopped + 1}", "train.save_every=0", "train.resume=auto"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert [r["step"] for r in records(run)] == list(range(1, stopped + 2))  # each step once, continued
