"""Elastic resume on the user's path: a run SIGKILLed at a seeded step continues on another number of ranks
(2 -> 1, 1 -> 2, and 4 -> 2 under HSDP) with the per-step losses of a run never stopped (within 1e-5
relative: the split of the global batch over ranks changes the summation order), across epoch boundaries
(8 packed rows, 4 per step: an epoch every 2 steps), from the real CLI, model, tokenizer and loader.

The weights start from a saved folder (model.load_from), so the comparison is about resuming, not initialising
(a random init is the same on any layout too: tests/distributed/test_engine_split_invariance.py)."""

import os
import random

import pytest

from tests.reliability.helpers import ROOT, checkpoint_state, records, run_args, write_chat_data, xtune
from tests.reliability.test_kill_resume import kill_after_step, resumed_from

SEED = int(os.environ.get("XTUNE_RELIABILITY_SEED", "20261123"))
STEPS = 6


def args(ws, run, nproc, *extra):
    return run_args(ws["data"], ws["cache"], run, f"model.load_from={ws['init']}", "data.pack_max_length=256",
                    "data.sample_max_length=256",
                    "train.global_batch_size=4", f"train.max_steps={STEPS}", "train.keep_last=10",
                    f"parallel.nproc_per_node={nproc}", *extra)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import torch
    import yaml
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("elastic")
    arch = yaml.safe_load((ROOT / "conf" / "model" / "qwen3_tiny.yaml").read_text())["arch"]
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**arch)).save_pretrained(str(root / "init"))
    return {"root": root, "data": write_chat_data(root / "chat.jsonl", 24), "cache": root / "cache",
            "init": root / "init"}


@pytest.fixture(scope="module")
def reference(ws):
    run = ws["root"] / "reference"
    out = xtune(*args(ws, run, 1))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 steps/epoch" in out.stdout + out.stderr  # the resumed runs cross epoch boundaries
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)) and recs[-1]["loss"] < recs[0]["loss"]
    return recs


def check_resume(text, n0, n1, low, high):
    """The run resumed from a step in [low, high] and said how the layout changed."""
    assert resumed_from(text), text[-3000:]
    _, step = resumed_from(text)
    assert low <= step <= high, step
    assert f"layout: saved by {n0} rank{'s' if n0 > 1 else ''}" in text, text[-3000:]
    assert f"now {n1} rank{'s' if n1 > 1 else ''}" in text
    return step


def assert_close_losses(reference, got):
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


def test_two_ranks_to_one_and_back_is_exact(ws, reference, tmp_path):
    """2 ranks, SIGKILL at a seeded step; resumed on 1 rank, SIGKILL again; resumed on 2 ranks to the end."""
    run = tmp_path / "run"
    rng = random.Random(SEED)
    k1 = rng.randint(2, 3)  # a checkpoint (one every step) exists by then
    kill_after_step(args(ws, run, 2), run, k1)
    out = kill_after_step(args(ws, run, 1, "train.resume=auto"), run, k1 + 2)
    step = check_resume(out, 2, 1, k1 - 1, k1 + 1)  # the newest complete checkpoint when killed
    # The last segment saves asynchronously: DCP's background writes on 2 ranks over their own gloo group.
    out = xtune(*args(ws, run, 2, "train.resume=auto", "train.async_save=true"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    step2 = check_resume(out.stdout + out.stderr, 1, 2, step + 1, STEPS - 2)  # an epoch boundary (after 2, 4) lies ahead
    assert_close_losses(reference, records(run))
    # Each of its checkpoints is complete (marker after both ranks' shards) and holds what was exported at the end.
    st = checkpoint_state(run)
    assert st["tmp"] == [] and st["latest"] == f"step-{STEPS}" and set(range(step2, STEPS + 1)) <= set(st["complete"])
    assert_checkpoint_is_export(run / "checkpoints" / f"step-{STEPS}", run / "hf")


def assert_checkpoint_is_export(ckpt, hf):
    """The checkpoint's weights (read by the checksum-verifying loader) equal the HF export's."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from xtune.checkpoint.dcp import load_model_only

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    load_model_only(ckpt, model)
    exported = load_file(str(hf / "model.safetensors"))
    got = model.state_dict()
    assert exported and all(torch.equal(v, got[k]) for k, v in exported.items())


@pytest.mark.slow
def test_hsdp_four_ranks_to_two_is_exact(ws, reference, tmp_path):
    """4 ranks as 2 replicas x 2 shards, SIGKILL; resumed on 2 ranks as 2 replicas x 1 shard."""
    run = tmp_path / "run"
    kill_after_step(args(ws, run, 4, "parallel.replicate_degree=2"), run, 2)
    out = xtune(*args(ws, run, 2, "parallel.replicate_degree=2", "train.resume=auto"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_resume(out.stdout + out.stderr, 4, 2, 1, 3)
    assert_close_losses(reference, records(run))
