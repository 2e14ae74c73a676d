"""Checkpoint faults as the user meets them on the command line.

tests/unit/test_engine_checkpoint.py proves detection (read_marker / resolve_resume) and a failed save
inside the engine; here the same situations go through `python -m xtune sft`: a damaged checkpoint given to
`train.resume` is refused with a message naming it and what is wrong (non-zero exit, no traceback, nothing
trained), and a disk that fills up during a save stops the run cleanly with the previous checkpoint intact,
from which `train.resume=auto` then finishes the run exactly as if nothing had happened.
"""

import shutil

import pytest

from tests.reliability.helpers import (
    STEPS,
    assert_same_losses,
    checkpoint_state,
    last_step,
    records,
    run_args,
    xtune,
)


def damage_no_marker(ck):
    (ck / "meta.json").unlink()  # a save that never finished, renamed by hand


def damage_truncated_shard(ck):
    shard = max(ck.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short


# (id, damage to checkpoints/step-STEPS, train.resume value, message fragments). The other kinds of damage
# (garbage or incomplete marker, missing .metadata / extra-rank files, dangling `latest`) go through the same
# preflight call as partial_by_path and are covered at unit level.
ROWS = [
    ("partial_by_path", damage_no_marker, "{run}/checkpoints/step-" + str(STEPS),
     ["checkpoint {ck} is incomplete (no meta.json)", "delete it or resume from an earlier one"]),
    ("truncated_shard", damage_truncated_shard, "auto", ["checkpoint {ck} is corrupt: __0_0.distcp has", "truncated"]),
]


# Slow: the bad-input table (test_bad_input_table.py: ckpt_no_marker, ckpt_shard_truncated) gives the same
# checkpoints to the same command line in-process; this adds only that nothing in the run dir changed.
@pytest.mark.slow
@pytest.mark.parametrize("damage, resume, fragments", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_damaged_checkpoint_is_refused_on_the_command_line(workspace, reference, tmp_path, damage, resume,
                                                           fragments):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    ck = run / "checkpoints" / f"step-{STEPS}"
    damage(ck)
    metrics = (run / "metrics.jsonl").read_bytes()
    before = checkpoint_state(run)
    out = xtune(*run_args(workspace["data"], workspace["cache"], run, f"train.resume={resume.format(run=run)}"))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]  # bad input: pick another checkpoint
    message = " ".join(out.stderr.split())
    for frag in fragments:
        assert frag.format(ck=ck) in message, (frag, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-3000:]
    assert "resumed from" not in out.stdout  # never loaded, not even in part
    assert (run / "metrics.jsonl").read_bytes() == metrics and checkpoint_state(run) == before


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resume_finishes_exactly(
        workspace, reference, tmp_path):
    run = tmp_path / "run"
    args = run_args(workspace["data"], workspace["cache"], run)
    # Checkpoint 3's shard writes hit ENOSPC after 256 kB (a partly written shard file is left behind).
    out = xtune(*args, fault="enospc:3:262144")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    ckpts = run / "checkpoints"
    assert f"saving checkpoint step 3 under {ckpts} failed" in message, out.stderr[-3000:]
    # torch's writer turns the OSError into "RuntimeError: ... unexpected pos ..." (also on a real full disk);
    # this disk is not really full, so no free-space hint either.
    assert "rank 0: RuntimeError" in message and "the disk is (nearly) full" not in message
    assert f"the previous checkpoint {ckpts / 'step-2'} is intact" in message
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-3000:]
    st = checkpoint_state(run)
    assert st == {"complete": [1, 2], "incomplete": [], "tmp": [], "latest": "step-2"}, st
    assert last_step(run) == 3 and not (run / "hf").exists()

    out = xtune(*args, "train.resume=auto")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"resumed from {ckpts / 'step-2'} at step 2" in out.stdout
    assert_same_losses(reference["records"], records(run))
    assert checkpoint_state(run)["complete"] == [STEPS - 2, STEPS - 1, STEPS]


@pytest.mark.parametrize("override, key", [("model.arch.hidden_size=64", "model.arch.hidden_size"),
                                           pytest.param("train.seed=7", "train.seed", marks=pytest.mark.slow)])
def test_resume_with_a_key_that_cannot_change_exits_2(workspace, reference, tmp_path, override, key):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    # Hydra's own record (.hydra/) and the command line's (cmd.txt, env.json) are rewritten per command.
    keep = lambda p: p.is_file() and ".hydra" not in p.parts and p.name not in ("cmd.txt", "env.json")  # noqa: E731
    before = {p: p.read_bytes() for p in run.rglob("*") if keep(p)}
    out = xtune(*run_args(workspace["data"], workspace["cache"], run, "train.resume=auto", override))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    assert f"{run}/checkpoints/step-{STEPS} was trained with another value of {key}" in message, message
    assert "cannot change when resuming" in message and "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if keep(p)} == before  # nothing ran
