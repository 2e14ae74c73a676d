"""The grpo section composes (conf/grpo.yaml, conf/grpo/default.yaml, recipes/demo_grpo.yaml) and every bad value
is refused before anything is built, naming the key and what is allowed (exit 2 through the CLI)."""

import subprocess
import sys

import pytest

from xtune.config.compose import compose_jobs
from xtune.config.schema import GrpoSpec, RewardSpec
from xtune.errors import ConfigError


def _problems(*overrides):
    with pytest.raises(ConfigError) as e:
        compose_jobs("grpo", ["recipe=demo_grpo", "model.load_from=null", *overrides])
    return "\n".join(e.value.problems)


def test_the_demo_recipe_composes_with_the_grpo_group():
    spec = compose_jobs("grpo", ["recipe=demo_grpo", "model.load_from=null", "grpo.loss=dr_grpo", "grpo.epsilon_high=0.28",
                                 "grpo.importance_sampling_level=sequence"])[0].spec
    assert spec.method == "grpo"
    g = spec.grpo
    assert isinstance(g, GrpoSpec) and g.num_generations == 4 and g.loss == "dr_grpo"
    assert g.epsilon_high == 0.28 and g.importance_sampling_level == "sequence"
    assert g.rewards[0] == RewardSpec(builtin="regex") and g.rewards[1].fn == "demo_rewards:closeness"
    # the group's defaults fill what the recipe leaves out
    assert (g.advantage, g.scale_rewards, g.beta, g.num_iterations) == ("group", "group", 0.0, 1)


def test_a_reward_list_of_user_functions_composes(tmp_path):
    spec = compose_jobs("grpo", ["recipe=demo_grpo", "model.load_from=null", f"grpo.reward_path={tmp_path}",
                                 "grpo.rewards=[{fn: my_rewards:brevity, weight: 0.5, args: {limit: 3}},"
                                 " {builtin: format, args: {pattern: 'a+'}}]"])[0].spec
    fn, fmt = spec.grpo.rewards
    assert (fn.fn, fn.weight, fn.args) == ("my_rewards:brevity", 0.5, {"limit": 3})
    assert (fmt.builtin, fmt.args) == ("format", {"pattern": "a+"})


@pytest.mark.parametrize("overrides, fragment", [
    (["grpo.advantage=ppo"], "grpo.advantage=ppo: not allowed; choose one of group, rloo"),
    (["grpo.scale_rewards=std"], "grpo.scale_rewards=std: not allowed; choose one of group, batch, none"),
    (["grpo.loss=ppo"], "grpo.loss=ppo: not allowed; choose one of grpo, dr_grpo, dapo"),
    (["grpo.importance_sampling_level=sequense"], "choose one of token, sequence. Did you mean 'sequence'?"),
    (["grpo.num_generations=1"], "grpo.num_generations=1: must be >= 2"),
    (["grpo.num_iterations=0"], "grpo.num_iterations=0: must be >= 1"),
    (["grpo.dynamic_sampling_max_rounds=-1"], "grpo.dynamic_sampling_max_rounds=-1: must be >= 0"),
    (["grpo.epsilon=0"], "grpo.epsilon=0.0: must be in (0, 1)"),
    (["grpo.epsilon_high=-0.1"], "grpo.epsilon_high=-0.1: must be > 0"),
    (["grpo.beta=-1"], "grpo.beta=-1.0: must be >= 0"),
    (["grpo.max_prompt_length=0"], "grpo.max_prompt_length=0: must be >= 1"),
    (["grpo.num_generations=3"], "train.global_batch_size=32 counts completions and must be a multiple of "
                                 "grpo.num_generations=3"),
    (["data.pack=hard"], "data.pack=hard cuts documents"),
    (["data.eval_datasets=[{name: e, path: x.jsonl}]"], "data.eval_datasets: grpo has no eval loss over prompt records"),
    (["parallel.sp_size=2", "parallel.nproc_per_node=2", "train.global_batch_size=16"],
     "parallel.sp_size=2: grpo does not run under sequence parallelism yet"),
    (["gen.temperature=0"], "gen.temperature=0.0: grpo samples its completions; give a temperature > 0"),
    (["grpo.max_prompt_length=1000", "gen.max_new_tokens=100"], "grpo.max_prompt_length=1000 + gen.max_new_tokens=100 "
                                                                "exceeds data.pack_max_length=1024"),
    (["grpo.rewards=[]"], "grpo.rewards is empty"),
    (["grpo.rewards=[{builtin: nope}]"], "grpo.rewards[0].builtin=nope: not allowed; choose one of exact, "
                                         "regex, math, format, length"),
    (["grpo.rewards=[{builtin: exact, fn: 'a:b'}]"], "grpo.rewards[0]: give exactly one of fn"),
    (["grpo.rewards=[{weight: 1.0}]"], "grpo.rewards[0]: give exactly one of fn"),
    (["grpo.rewards=[{fn: just_a_module}]"], "grpo.rewards[0].fn=just_a_module: expected module:function"),
    (["grpo.rewards=[{builtin: format}]"], "grpo.rewards[0]: builtin format needs args.pattern"),
    (["grpo.rewards=[{builtin: format, args: {pattern: '(a'}}]"], "grpo.rewards[0].args.pattern='(a': not a valid"),
    (["grpo.rewards=[{builtin: length, args: {max_tokens: 0}}]"], "builtin length needs args.max_tokens"),
    (["grpo.rewards=[{builtin: exact, args: {pattern: x}}]"], "grpo.rewards[0].args.pattern: builtin exact takes "
                                                              "no such argument; allowed: field, normalize"),
    (["grpo.rewards=[{builtin: exact}, {builtin: exact}]"], "two rewards are named exact"),
    (["grpo.rewards=[{fn: 'm:f'}]", "grpo.reward_path=/nonexistent/dir"],
     "grpo.reward_path=/nonexistent/dir: no such folder"),
])
def test_each_bad_grpo_value_names_its_key(overrides, fragment):
    assert fragment in _problems(*overrides)


def test_all_grpo_problems_are_reported_together():
    text = _problems("grpo.num_generations=1", "grpo.epsilon=2", "grpo.rewards=[{builtin: foo}]")
    assert "grpo.num_generations=1" in text and "grpo.epsilon=2.0" in text and "builtin=foo" in text


def test_an_sft_run_ignores_the_grpo_section():
    # the grpo checks are for method=grpo only: an sft recipe with an empty reward list is valid
    spec = compose_jobs("sft", ["recipe=demo"])[0].spec
    assert spec.method == "sft" and spec.grpo.rewards == []


def test_the_cli_refuses_a_bad_value_with_exit_2():
    out = subprocess.run([sys.executable, "-m", "xtune", "grpo", "grpo.loss=ppo", "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "grpo.loss=ppo: not allowed; choose one of grpo, dr_grpo, dapo" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
