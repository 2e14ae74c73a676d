"""`xtune grpo`, SIGKILLed mid-run and resumed with train.resume=auto: the resumed steps sample the same prompts
with the same random stream (the same completions, logged in samples.jsonl) and every step's loss, gradient norm,
reward and completion metrics equal an uninterrupted run's exactly."""

import json
import textwrap

from tests.reliability.helpers import assert_same_losses, records, xtune
from tests.reliability.test_kill_resume import kill_after_step

STEPS = 6
REWARDS = """
def chars(prompts, completions, **kwargs):
    return [float(len(c) % 7) for c in completions]
"""


def _args(tmp_path, work_dir, *extra):
    return ["grpo", "recipe=demo_grpo", "model.load_from=null", "gen.temperature=1.0", "gen.max_new_tokens=8",
            "train.global_batch_size=8", "train.micro_batch_size=4", "grpo.num_generations=4", "optim.lr=1e-3",
            "grpo.rewards=[{fn: toy_rewards:chars}]", f"grpo.reward_path={tmp_path}", f"data.cache_dir={tmp_path}/c",
            "data.num_workers=0", "logging.tensorboard=false", "logging.progress=plain", "train.log_every=1",
            f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=2", "train.sample_every=1",
            f"train.work_dir={work_dir}", *extra]


def _samples(run_dir):
    return {(s["step"], json.dumps(s["prompt"]), s["completion"])
            for s in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())}


def test_grpo_sigkill_and_resume_samples_the_same_stream(tmp_path):
    (tmp_path / "toy_rewards.py").write_text(textwrap.dedent(REWARDS))
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    out = xtune(*_args(tmp_path, ref_run), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = records(ref_run)
    assert len(expected) == STEPS and any(r["grad_norm"] > 0 for r in expected)

    kill_after_step(_args(tmp_path, run), run, 3)
    out = xtune(*_args(tmp_path, run, "train.resume=auto"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = records(run)
    assert_same_losses(expected, got)
    for a, b in zip(expected, got):
        for key in ("reward", "reward_std", "entropy", "completions/mean_length", "frac_reward_zero_std"):
            assert a[key] == b[key], (a["step"], key)
    # the samples of every step (a prompt and a completion per group) are the uninterrupted run's
    assert _samples(ref_run) <= _samples(run) and {s[0] for s in _samples(run)} == set(range(1, STEPS + 1))
