"""The GRPO demo visibly learns on a CPU: from the SFT demo's model, `xtune grpo recipe=demo_grpo` raises the mean
reward (fixed seeds). Slow: it trains the SFT demo first (300 steps) and then 150 GRPO steps, minutes on 2 cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 30  # steps averaged at each end
MARGIN = 0.04  # the last steps' mean reward exceeds the first steps' by at least this (measured: 0.18 -> 0.28)


def _xtune(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "xtune", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_demo_grpo_raises_the_mean_reward(tmp_path):
    sft = tmp_path / "sft"
    _xtune("sft", "recipe=demo", f"train.work_dir={sft}", f"data.cache_dir={tmp_path}/c", cwd=ROOT)
    run = tmp_path / "grpo"
    _xtune("grpo", "recipe=demo_grpo", f"model.load_from={sft / 'hf'}", f"train.work_dir={run}", "train.log_every=1",
           f"data.cache_dir={tmp_path}/c", cwd=ROOT)
    rewards = [r["reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert len(rewards) == 150
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    assert last >= first + MARGIN, (first, last)
