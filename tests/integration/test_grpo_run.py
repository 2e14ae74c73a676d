"""`xtune grpo` end to end in one process with the real stages (tiny Qwen3, bundled prompts, transformers'
generation on the live policy): metrics under TRL's names, exact resume (the same prompts, completions and losses as
a run never stopped), the KL to the reference (LoRA / QLoRA: the base; full tuning: a frozen initial copy) and the second
pass of a rollout (num_iterations=2) moving the ratio away from 1; a bad reward stops the run with exit 2."""

import json
import textwrap

import pytest

from xtune.config.compose import load_spec
from xtune.errors import XtuneError
from xtune.launch.launcher import run

BASE = ["recipe=demo_grpo", "model.load_from=null", "train.global_batch_size=8", "gen.temperature=1.0",
        "train.micro_batch_size=4", "grpo.num_generations=4",
        "gen.max_new_tokens=8", "logging.tensorboard=false", "data.num_workers=0", "train.log_every=1",
        "optim.lr=1e-3", "grpo.rewards=[{fn: toy_rewards:chars}, {builtin: regex}]", "train.save_every=0",
        "train.sample_every=0"]
REWARDS = """
def chars(prompts, completions, answer, **kwargs):
    assert len(prompts) == len(completions) == len(answer)
    return [float(len(c) % 7) for c in completions]

def broken(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)
"""
TRL_NAMES = ("reward", "reward_std", "rewards/chars/mean", "rewards/chars/std", "rewards/regex/mean",
             "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio", "entropy", "time/generation_s")


@pytest.fixture()
def reward_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "toy_rewards.py").write_text(textwrap.dedent(REWARDS))
    return tmp_path


def _run(tmp_path, run_dir, *overrides):
    _, spec = load_spec(BASE + [f"grpo.reward_path={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                                *overrides], command="grpo")
    return run(spec, run_dir)


def _records(run_dir, name="metrics.jsonl"):
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def test_grpo_logs_trl_metrics_and_resumes_exactly(reward_dir):
    straight, split = reward_dir / "straight", reward_dir / "split"
    common = ["train.save_every=2", "train.sample_every=1"]
    assert _run(reward_dir, straight, "train.max_steps=4", *common) == 0
    assert _run(reward_dir, split, "train.max_steps=2", *common) == 0
    assert _run(reward_dir, split, "train.max_steps=4", "train.resume=auto", *common) == 0

    a, b = _records(straight), _records(split)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for name in TRL_NAMES:
        assert name in a[0], name
    assert "kl" not in a[0]  # beta = 0: no reference, no kl
    assert any(r["reward_std"] > 0 for r in a) and any(r["grad_norm"] > 0 for r in a)
    for ra, rb in zip(a, b):  # resumed steps 3 and 4 equal the run that never stopped
        for key in ("loss", "grad_norm", "reward", "entropy", "completions/mean_length", "rewards/chars/mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    # the same prompts and the same completions (the samples of every step: one per prompt group)
    sa, sb = _records(straight, "samples.jsonl"), _records(split, "samples.jsonl")
    assert [s for s in sa if s["step"] > 2] == [s for s in sb if s["step"] > 2]
    assert len({json.dumps(s["prompt"]) for s in sa}) == 8  # 2 prompts a step, no repeat within the first pass
    assert (straight / "hf" / "config.json").is_file()


@pytest.mark.parametrize("peft", ["lora", "qlora", "none"])
def test_kl_to_the_reference_and_the_second_pass_of_a_rollout(reward_dir, peft):
    run_dir = reward_dir / f"run-{peft}"
    # peft.dropout=0: qlora's group sets 0.1, and adapter dropout in the training forward moves a first pass's
    # ratio away from 1 (the rollout's log-probs are taken without it), which epsilon 0.01 then clips
    assert _run(reward_dir, run_dir, f"peft={peft}", "train.max_steps=3", "grpo.beta=0.1", "grpo.num_iterations=2",
                "grpo.loss=grpo", "grpo.importance_sampling_level=sequence", "grpo.epsilon=0.01",
                "optim.lr=5e-2", *(["peft.dropout=0.0"] if peft != "none" else [])) == 0
    first, second, third = _records(run_dir)
    # step 1: the policy is the reference (LoRA B = 0, or the initial copy) and the sampler: kl 0, ratio 1
    assert first["kl"] == 0.0 and first["clip_ratio/region_mean"] == 0.0
    # step 2 trains on the same rollout after one update: the policy has moved from both
    assert second["kl"] > 0.0 and second["reward"] == first["reward"]
    assert second["clip_ratio/region_mean"] > 0.0
    # step 3 is a new rollout, sampled by the updated policy: its first pass has ratio 1 but the reference is still
    # the initial model, so the kl stays > 0
    assert third["kl"] > 0.0 and third["clip_ratio/region_mean"] == 0.0


def test_a_reward_that_returns_the_wrong_length_stops_the_run(reward_dir):
    with pytest.raises(XtuneError, match=r"reward broken \(fn toy_rewards:broken\) returned 7 values for 8 "
                                         r"completions: return one number per completion \(first record "
                                         r".*grpo_train.jsonl:\d+\)") as e:
        _run(reward_dir, reward_dir / "bad", "train.max_steps=1", "grpo.rewards=[{fn: toy_rewards:broken}]")
    assert e.value.exit_code == 2


def test_dynamic_sampling_replaces_groups_without_signal(reward_dir):
    (reward_dir / "parity_rewards.py").write_text(textwrap.dedent("""
        def parity(prompts, completions, answer, **kwargs):
            # an even answer's group always scores 1 (no signal); an odd answer's varies with the completion
            return [1.0 if int(a) % 2 == 0 else float(len(c) % 5) for c, a in zip(completions, answer)]
    """))
    run_dir = reward_dir / "dynamic"
    assert _run(reward_dir, run_dir, "train.max_steps=3", "grpo.dynamic_sampling=true",
                "grpo.dynamic_sampling_max_rounds=8", "grpo.rewards=[{fn: parity_rewards:parity}]") == 0
    recs = _records(run_dir)
    for r in recs:
        assert "dynamic_sampling/rounds" in r
        if r["dynamic_sampling/filled"] == 0:  # a full batch of groups with signal
            assert r["frac_reward_zero_std"] == 0.0
    assert any(r["dynamic_sampling/rounds"] > 0 for r in recs)  # some step had to sample more prompts


def test_two_ranks_sample_and_train_under_fsdp2(reward_dir):
    """2 gloo ranks (FSDP2): the generation engine samples in lockstep on the sharded live model (after one root
    forward initialises FSDP), each rank trains its half of the completions, and the run checkpoints and exports.
    (The completions are not those of one rank: the engine seeds each rank's batches apart.)"""
    run_dir = reward_dir / "two"
    assert _run(reward_dir, run_dir, "parallel=cpu2", "train.max_steps=2", "train.micro_batch_size=2",
                "train.save_every=2") == 0
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == [1, 2] and all(name in recs[0] for name in TRL_NAMES)
    assert any(r["grad_norm"] > 0 for r in recs) and (run_dir / "hf" / "config.json").is_file()
    assert (run_dir / "checkpoints" / "step-2").is_dir()
