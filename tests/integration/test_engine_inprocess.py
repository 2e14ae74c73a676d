"""Single-process runs through `launch.run` with the real stages: MoE aux loss logging, and the user
errors that must surface before any process group exists."""

import dataclasses as dc
import json

import pytest
import torch

from xtune.errors import XtuneError

BASE = ["recipe=demo", "train.max_steps=2", "train.global_batch_size=2", "train.log_every=1",
        "data.pack_max_length=512", "data.sample_max_length=256", "logging.tensorboard=false",
        "train.sample_prompts=[]", "data.eval_datasets=[]", "train.eval_every=0"]


def spec_for(tmp_path, *extra):
    from xtune.config.compose import load_spec

    _, spec = load_spec(BASE + [f"data.cache_dir={tmp_path / 'cache'}"] + list(extra))
    return spec


def test_moe_aux_loss_is_logged_separately(tmp_path, monkeypatch):
    from xtune.launch.launcher import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = spec_for(tmp_path, "model=qwen3_moe_tiny")
    assert run(spec, tmp_path / "run") == 0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]  # the training steps' records (the demo's eval task logs its own)
    assert [r["step"] for r in recs] == [1, 2]
    # Switch-style balance loss is >= 1 * coef (0.001) and far below the CE (~ln 4096).
    assert all(0.0009 < r["aux_loss"] < 0.01 for r in recs)
    assert all(r["loss"] > 5 for r in recs)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("case", ["load_from", "tokenizer", "wandb"])
def test_user_errors_before_any_process_group(tmp_path, case):
    from xtune.methods import train

    spec = spec_for(tmp_path)
    if case == "load_from":
        spec = dc.replace(spec, model=dc.replace(spec.model, load_from=str(tmp_path / "nope")))
        match = "load_from"
    elif case == "tokenizer":
        (tmp_path / "tok").mkdir()
        spec = dc.replace(spec, model=dc.replace(spec.model, tokenizer=str(tmp_path / "tok")))
        match = "tokenizer"
    elif case == "wandb":
        pytest.importorskip("pytest")
        try:
            import wandb  # noqa: F401

            pytest.skip("wandb is installed")
        except ImportError:
            pass
        spec = dc.replace(spec, logging=dc.replace(spec.logging, wandb=True))
        match = "pip install wandb"
    with pytest.raises(XtuneError, match=match):
        train(spec, tmp_path / "run")
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
