"""fp16 compute with dynamic loss scaling under FSDP2 on 2 ranks: finite falling loss, an inf/nan gradient on ONE
rank skips the step on both and halves the scale, and a resumed run continues with the checkpointed scale."""

import json
from pathlib import Path

from tests.distributed.test_engine_optimizers import run_worker
from tests.distributed.tiny import save_tiny_hf

STEPS = 6


def recs(run_dir):
    out = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in out if "loss" in r}


def test_fp16_scaler_skips_overflow_and_resumes_the_scale(tmp_path):
    save_tiny_hf(tmp_path / "init", seed=1)
    common = ["--init", tmp_path / "init", "--steps", STEPS, "--save-every", 3, "--param-dtype", "float16"]
    # Each rank runs 2 micro-batches a step: forward call 2 is rank 0's first micro-batch of step 2.
    run_worker("train_worker.py", "--run-dir", tmp_path / "full", *common, "--nan-at-call", 2)
    full = recs(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1))
    import math

    scales = [full[s]["loss_scale"] for s in range(1, STEPS + 1)]
    assert scales[0] == 2.0**16 and scales[1] == 2.0**16  # step 2 ran with the initial scale and overflowed
    assert scales[2:] == [2.0**15] * (STEPS - 2)  # halved after the overflow, kept since (growth every 2000)
    assert full[2].get("skipped") and full[2]["overflow_steps"] == 1 and not math.isfinite(full[2]["grad_norm"])
    assert all(math.isfinite(full[s]["loss"]) for s in full if s != 2)
    assert all(not full[s].get("skipped") for s in full if s != 2)
    assert full[5]["loss"] < full[1]["loss"] - 0.05 and full[6]["loss"] < full[4]["loss"]

    run_worker("train_worker.py", "--run-dir", tmp_path / "resumed", *common,
               "--resume", tmp_path / "full" / "checkpoints" / "step-3")
    resumed = recs(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert resumed[s]["loss_scale"] == full[s]["loss_scale"] == 2.0**15
        assert resumed[s]["loss"] == full[s]["loss"], s
        assert resumed[s]["overflow_steps"] == 1
