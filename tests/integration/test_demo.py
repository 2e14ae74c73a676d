"""The README's first command: the built-in demo trains, evaluates, exports and generates on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# The README's command as is (300 steps, minutes on 2 cores) is slow; the default run trains the same recipe
# for 60 steps (the same schedule shape, compressed), which already more than halves the loss.
@pytest.mark.parametrize("steps", [pytest.param(300, marks=pytest.mark.slow, id="as-in-readme"),
                                   pytest.param(60, id="60-steps")])
def test_demo_recipe_learns_and_reports_its_results(steps, tmp_path):
    run = tmp_path / "run"
    shorter = [] if steps == 300 else [f"train.max_steps={steps}", f"train.eval_every={steps}",
                                       f"train.save_every={steps}", "train.log_every=5"]
    out = subprocess.run(
        [sys.executable, "-m", "xtune", "sft", "recipe=demo", *shorter, f"train.work_dir={run}",
         f"data.cache_dir={tmp_path}/c"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert train[-1] <= 0.5 * train[0], train
    assert evals[steps] <= 0.5 * evals[0], evals
    # It ends by saying where the checkpoint and the export are, and by a generation from the export.
    assert f"checkpoint: {run}/checkpoints/step-{steps}" in out.stdout
    assert f"export:     {run}/hf" in out.stdout
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["completion"].strip() for s in samples)
    assert f"sample @ step {steps}> {samples[0]['prompt']} -> " in out.stdout
    assert (run / "hf" / "model.safetensors").exists() and (run / "checkpoints" / "latest").read_text().strip()


# Slow: LoRA runs through the same command line in tests/reliability/test_lora_resume.py, trains and exports
# for peft on 2 ranks in tests/integration/test_lora_families.py, and equals peft in tests/unit/test_tuning.py.
@pytest.mark.slow
def test_demo_recipe_with_lora_learns_and_exports_adapter_and_merged_model(tmp_path):
    """`xtune sft recipe=demo peft=lora`: adapters on every linear layer (the random-init embeddings and head
    train in full beside them, as the recipe says); the eval loss at least halves in 60 steps."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "xtune", "sft", "recipe=demo", "peft=lora", "train.max_steps=60", "train.eval_every=60",
         "train.save_every=60", f"train.work_dir={run}", f"data.cache_dir={tmp_path}/c"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trainable parameters: " in out.stdout
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert evals[60] <= 0.5 * evals[0], evals
    assert (run / "hf_adapter" / "adapter_model.safetensors").is_file() and (run / "hf" / "model.safetensors").is_file()
    assert json.loads((run / "hf_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        run / "base")


def test_demo_dpo_recipe_raises_reward_accuracy(tmp_path):
    """`xtune dpo` (recipe demo_dpo): DPO on the bundled generated pairs; step 1 is ln 2 (reference = policy),
    the eval reward accuracy ends >= 0.8 and the margin grows."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "xtune", "dpo", f"train.work_dir={run}", f"data.cache_dir={tmp_path}/c",
         "logging.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    train = [r for r in records if "loss" in r]
    assert abs(evals[0]["eval_loss"] - 0.6931471805599453) < 1e-6
    assert evals[80]["eval_rewards/accuracies"] >= 0.8, evals
    assert evals[80]["eval_rewards/margins"] > 1.0 and evals[80]["eval_loss"] < 0.5
    assert train[-1]["loss"] < 0.6 and "rewards/accuracies" in train[-1]
    assert list((run / "reference").glob("train-*.npy")) and (run / "hf" / "model.safetensors").is_file()
