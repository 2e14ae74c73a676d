"""GRPO rewards: the eval scorers by name, the format and length rewards, user functions from grpo.reward_path;
and a reward that raises, returns the wrong number of values or a non-finite one stops the run (exit 2) with a
message naming the function and the record."""

import math
import re
import sys
import textwrap

import pytest
import torch

from xtune.config.schema import GrpoSpec, RewardSpec
from xtune.errors import ConfigError, XtuneError
from xtune.methods.grpo_rewards import Batch, build_rewards, score, total


def _batch(completions, answers=None, lengths=None, **fields):
    n = len(completions)
    return Batch(prompts=[f"q{i}" for i in range(n)], completions=list(completions),
                 lengths=list(lengths or [len(c.split()) for c in completions]),
                 fields={"answer": list(answers or [""] * n), **fields},
                 sources=[f"prompts.jsonl:{i + 1}" for i in range(n)])


def _rewards(*items, reward_path=None):
    return build_rewards(GrpoSpec(rewards=[RewardSpec(**it) for it in items], reward_path=reward_path))


def test_eval_scorers_by_name_score_against_the_answer_field():
    rewards = _rewards({"builtin": "exact"}, {"builtin": "regex"}, {"builtin": "regex", "name": "gsm8k",
                                                                     "args": {"pattern": "gsm8k", "field": "solution"}})
    b = _batch(["42", "the sum is 42.", "<think>41?</think>42", "#### 7"], answers=["42", "42", "42", "7"],
               solution=["x #### 42", "#### 42", "#### 42", "so #### 7"])
    got = score(rewards, b)
    # exact: whitespace-normalised equality after the thinking block is removed; regex: the last number, numerically
    # equal; gsm8k: `#### N` extracted from both sides
    assert got.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    assert [r.name for r in rewards] == ["exact", "regex", "gsm8k"]


def test_math_scorer_reward_uses_math_verify():
    pytest.importorskip("math_verify")
    got = score(_rewards({"builtin": "math"}), _batch(["\\boxed{\\frac{1}{2}}", "0.4"], answers=["0.5", "1/2"]))
    assert got[:, 0].tolist() == [1.0, 0.0]


def test_format_reward_matches_the_whole_completion():
    r = _rewards({"builtin": "format", "args": {"pattern": r"<think>.*?</think>\s*<answer>.*?</answer>"}})
    b = _batch(["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>",
                "<think>a</think><answer>3</answer> trailing"])
    assert score(r, b)[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_length_penalty_counts_tokens_over_the_budget():
    r = _rewards({"builtin": "length", "args": {"max_tokens": 4}},
                 {"builtin": "length", "name": "steep", "args": {"max_tokens": 4, "penalty": 0.5}})
    got = score(r, _batch(["a", "b", "c"], lengths=[3, 4, 8]))
    assert got.tolist() == [[0.0, 0.0], [0.0, 0.0], [-1.0, -2.0]]


def test_weights_sum_the_rewards():
    r = _rewards({"builtin": "exact", "weight": 2.0}, {"builtin": "length", "weight": 0.5, "args": {"max_tokens": 1}})
    per = score(r, _batch(["1", "2"], answers=["1", "1"], lengths=[1, 3]))
    torch.testing.assert_close(total(r, per), torch.tensor([2.0, -1.0], dtype=torch.float64))


def _module(tmp_path, body, name="my_rewards"):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return str(tmp_path)


def test_user_function_gets_prompts_completions_fields_and_args(tmp_path):
    path = _module(tmp_path, """
        def brevity(prompts, completions, answer, topic, limit=100):
            return [float(len(c) <= limit) + (a == '1') + 10 * (t == 'x') for c, a, t in zip(completions, answer, topic)]
    """, name="rw_a")
    r = _rewards({"fn": "rw_a:brevity", "args": {"limit": 3}}, reward_path=path)
    assert r[0].name == "brevity"
    got = score(r, _batch(["abc", "abcd"], answers=["1", "2"], topic=["x", "y"]))
    assert got[:, 0].tolist() == [12.0, 0.0]
    assert path not in sys.path  # on the import path for that import alone


def test_a_missing_module_or_function_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no module 'nowhere_mod' in grpo.reward_path="):
        _rewards({"fn": "nowhere_mod:f"}, reward_path=str(tmp_path))
    path = _module(tmp_path, "def other(p, c, **k):\n    return [0.0] * len(c)\n", name="rw_b")
    with pytest.raises(ConfigError, match="module rw_b .* has no function 'brevity'"):
        _rewards({"fn": "rw_b:brevity"}, reward_path=path)


@pytest.mark.parametrize("body, fragment", [
    ("def f(p, c, **k):\n    raise RuntimeError('boom')\n",
     r"reward f \(fn rw_bad_\w+:f\) raised RuntimeError: boom \(batch of 3 completions, first record prompts.jsonl:1\)"),
    ("def f(p, c, **k):\n    return [1.0, 2.0]\n",
     r"reward f \(fn rw_bad_\w+:f\) returned 2 values for 3 completions"),
    ("def f(p, c, **k):\n    return 1.0\n", r"reward f \(fn rw_bad_\w+:f\) returned float for 3 completions"),
    ("def f(p, c, **k):\n    return [0.0, float('nan'), 1.0]\n",
     r"reward f \(fn rw_bad_\w+:f\) returned nan for completion 1 of record prompts.jsonl:2: rewards must be finite"),
    ("def f(p, c, **k):\n    return [0.0, 1.0, 'yes']\n", r"returned 'yes' for completion 2 of record prompts.jsonl:3"),
])
def test_a_bad_reward_stops_the_run_naming_the_function_and_the_record(tmp_path, body, fragment):
    name = "rw_bad_" + re.sub(r"\W", "_", tmp_path.name)  # a module name of its own (sys.modules caches them)
    r = _rewards({"fn": f"{name}:f"}, reward_path=_module(tmp_path, body, name=name))
    with pytest.raises(XtuneError, match=fragment) as e:
        score(r, _batch(["a", "b", "c"]))
    assert e.value.exit_code == 2


def test_a_scorer_without_its_field_names_the_field():
    with pytest.raises(XtuneError, match=r"reward exact \(builtin exact\) raised KeyError: .*no field 'solution'"):
        score(_rewards({"builtin": "exact", "args": {"field": "solution"}}), _batch(["1"]))


def test_numpy_and_tensor_values_are_accepted():
    np = pytest.importorskip("numpy")
    b = _batch(["a", "b"])
    rewards = _rewards({"builtin": "length", "args": {"max_tokens": 1}})
    rewards[0].call = lambda batch: [np.float32(0.5), torch.tensor(2.0)]
    assert score(rewards, b)[:, 0].tolist() == [0.5, 2.0]
    assert math.isfinite(float(total(rewards, score(rewards, b)).sum()))
