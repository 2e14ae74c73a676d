"""End to end through the real stages: recipe -> RunSpec -> launch.run spawning 2 torchrun workers
(FSDP2 over gloo) -> real data loader and Qwen3 adapter -> metrics, eval, checkpoints, HF export,
samples; then `export_checkpoint` and transformers loading of both exports."""

import json
import os

import pytest
import torch

from tests.distributed.tiny import child_env
from xtune.config.io import spec_from_yaml

OVERRIDES = [
    "recipe=demo", "parallel=cpu2", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
    "train.log_every=1", "train.global_batch_size=4", "model.arch.hidden_size=64", "model.arch.num_hidden_layers=2",
    "model.arch.intermediate_size=128", "data.pack_max_length=512", "data.sample_max_length=256",
    "train.sample_max_new_tokens=4", "logging.tensorboard=true",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from xtune.config.compose import load_spec
    from xtune.launch.launcher import run

    tmp = tmp_path_factory.mktemp("e2e")
    _, spec = load_spec(OVERRIDES + [f"data.cache_dir={tmp / 'cache'}", f"train.work_dir={tmp / 'run'}"])
    old = dict(os.environ)
    os.environ.update(child_env())
    try:
        assert run(spec, tmp / "run") == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    return tmp / "run"


def test_run_dir_contents(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # eval_every=2: the untrained model at step 0, then every 2 steps
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["eval_loss"] > 0 for r in evals)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert len(list((run_dir / "checkpoints" / "step-4").glob("*.distcp"))) == 2  # both ranks wrote their shard
    assert any((run_dir / "tb").iterdir())
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    prompts = list(spec_from_yaml(run_dir / "config.yaml").train.sample_prompts)
    assert samples and prompts and [s["prompt"] for s in samples] == prompts


def test_hf_export_matches_checkpoint(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_model, export_checkpoint
    from xtune.config.io import spec_from_yaml
    from xtune.models import get_adapter

    tok = AutoTokenizer.from_pretrained(str(run_dir / "hf"))
    ids = tok("Reverse the words: red green blue", return_tensors="pt")["input_ids"]
    spec = spec_from_yaml(run_dir / "config.yaml")
    model, _ = build_plain_model(get_adapter(spec.model), spec)
    load_model_only(run_dir / "checkpoints" / "step-4", model)
    want = model(input_ids=ids).logits
    got = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    out = export_checkpoint(run_dir / "checkpoints" / "step-4", tmp_path / "exported")
    got = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
