"""SIGKILL at seeded random moments of a real single-process CLI run (a checkpoint every step), and once
while a checkpoint is being written; `train.resume=auto` in the same work_dir must always continue from
the last COMPLETE checkpoint, and the finished run must equal the uninterrupted reference exactly.

tests/distributed/test_engine_resume.py proves one kill at a fixed point on 2 ranks with the engine's test
adapter and loader; this drives the user's path: `python -m xtune sft ... train.resume=auto`, the real
model adapter, tokenizer, data cache and loader, and kills at varying points, repeatedly in one work_dir.
"""

import os
import random
import signal
import time

from tests.reliability.helpers import (
    STEPS,
    assert_same_losses,
    checkpoint_state,
    last_step,
    records,
    run_args,
    start,
    xtune,
)

SEED = int(os.environ.get("XTUNE_RELIABILITY_SEED", "20261123"))


def kill_points(seed: int) -> list:
    """Two steps to kill after and one checkpoint to kill inside, in order, >= 2 steps apart (so every
    resumed segment makes progress past the previous kill)."""
    rng = random.Random(seed)
    k1 = rng.randint(2, 4)
    k2 = rng.randint(k1 + 2, 6)
    k3 = rng.randint(k2 + 2, STEPS - 1)
    return [k1, k2, k3]


def kill_after_step(args, run, k):
    """Start the CLI; SIGKILL it as soon as metrics.jsonl shows step k (the kill then lands somewhere in
    step k's checkpoint save or in step k + 1: the moment is not controlled, the invariant must hold anyway)."""
    proc = start(*args)
    deadline = time.time() + 120
    try:
        # Records left by an earlier kill stop at most one step after it, < k (kill points are >= 2 apart).
        while last_step(run) < k:
            assert proc.poll() is None, f"the run ended before step {k}:\n{proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, f"step {k} never came"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (it finished?):\n{out[-3000:]}"
    return out


def resumed_from(output: str):
    for line in output.splitlines():
        if line.startswith("resumed from "):
            path, step = line[len("resumed from "):].rsplit(" at step ", 1)
            return path, int(step)
    return None


def expect_resume_point(run, killed_at):
    """The newest complete checkpoint on disk (read without the engine), checked for atomicity."""
    st = checkpoint_state(run)
    assert not st["incomplete"], f"a step-N folder without its marker: {st}"  # partial saves stay .tmp-*
    assert st["complete"], st
    newest = st["complete"][-1]
    assert killed_at - 1 <= newest <= killed_at + 1, (killed_at, st)
    assert st["latest"] in (f"step-{newest}", f"step-{newest - 1}"), st  # killed between rename and pointer
    return newest


def test_sigkill_at_random_steps_and_inside_a_save_resumes_exactly(workspace, reference, tmp_path):
    k1, k2, k3 = kill_points(SEED)
    run = tmp_path / "run"
    base = run_args(workspace["data"], workspace["cache"], run)
    resume = base + ["train.resume=auto"]
    seen = []

    # 1. Fresh run, killed after step k1.
    kill_after_step(base, run, k1)
    expected = expect_resume_point(run, last_step(run))
    seen.append(("kill", k1, expected))

    # 2. Resumed, killed after step k2: it must have continued from the newest complete checkpoint.
    out = kill_after_step(resume, run, k2)
    assert resumed_from(out) == (str(run / "checkpoints" / f"step-{expected}"), expected), out[-2000:]
    expected = expect_resume_point(run, last_step(run))
    seen.append(("kill", k2, expected))

    # 3. Resumed, SIGKILLed while checkpoint k3 is written (shards + per-rank state on disk, no marker).
    out = xtune(*resume, fault=f"kill-before-marker:{k3}")
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    assert resumed_from(out.stdout + out.stderr) == (str(run / "checkpoints" / f"step-{expected}"), expected)
    st = checkpoint_state(run)
    partial = run / "checkpoints" / f".tmp-step-{k3}"
    assert st["tmp"] == [partial.name] and st["complete"][-1] == k3 - 1, st
    assert (partial / ".metadata").is_file() and (partial / "state.json").is_file()
    assert not (partial / "meta.json").exists()
    assert st["latest"] == f"step-{k3 - 1}"
    assert last_step(run) == k3  # step k3 was logged before its save: it must be dropped and redone
    seen.append(("kill-in-save", k3, k3 - 1))

    # 4. Resumed to the end: from step k3 - 1, never from the partial folder.
    out = xtune(*resume)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert resumed_from(out.stdout + out.stderr) == (str(run / "checkpoints" / f"step-{k3 - 1}"), k3 - 1)
    assert_same_losses(reference["records"], records(run))
    st = checkpoint_state(run)
    assert st["tmp"] == [] and st["complete"] == [STEPS - 2, STEPS - 1, STEPS] and st["latest"] == f"step-{STEPS}"
    assert (run / "hf" / "config.json").is_file()
    print("kill points", seen)
