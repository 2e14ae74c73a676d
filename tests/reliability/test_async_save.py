"""train.async_save on the user's path (real CLI, model, tokenizer, loader; single process): SIGKILL while a
checkpoint is written in the background, after training has already moved past it. The previous checkpoint
stays the resume point (the one in flight has no marker, `latest` never moved), keep_last=1 kept both it and
the partial one, and the resumed run, saving asynchronously too, equals the uninterrupted synchronous
reference step for step and writes byte-identical shards."""

import json
import os
import random
import signal

from tests.reliability.helpers import STEPS, assert_same_losses, checkpoint_state, records, run_args, xtune
from tests.reliability.test_kill_resume import resumed_from

SEED = int(os.environ.get("XTUNE_RELIABILITY_SEED", "20261123"))


def shard_sums(ckpt):
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    return {name: f for name, f in files.items() if name.endswith(".distcp")}


def test_sigkill_during_background_write_resumes_exactly(workspace, reference, tmp_path):
    k = random.Random(SEED).randint(3, STEPS - 3)
    run = tmp_path / "run"
    args = run_args(workspace["data"], workspace["cache"], run, "train.async_save=true", "train.keep_last=1")

    out = xtune(*args, fault=f"kill-in-async-write:{k}")
    text = out.stdout + out.stderr
    assert out.returncode == -signal.SIGKILL, text[-3000:]
    assert f"fault: step {k + 1} trained while checkpoint {k} was being written" in text  # training went on
    st = checkpoint_state(run)
    assert st == {"complete": [k - 1], "incomplete": [], "tmp": [f".tmp-step-{k}"], "latest": f"step-{k - 1}"}, st
    assert not (run / "checkpoints" / f".tmp-step-{k}" / "meta.json").exists()

    out = xtune(*args, "train.resume=auto")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert resumed_from(text) == (str(run / "checkpoints" / f"step-{k - 1}"), k - 1)
    assert_same_losses(reference["records"], records(run))
    st = checkpoint_state(run)
    assert st == {"complete": [STEPS], "incomplete": [], "tmp": [], "latest": f"step-{STEPS}"}, st
    final = f"checkpoints/step-{STEPS}"
    assert shard_sums(run / final) == shard_sums(reference["dir"] / final)  # the same bytes as a sync save
