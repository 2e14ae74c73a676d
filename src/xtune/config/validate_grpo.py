"""The grpo section (`xtune grpo`) and what online RL needs of the other sections, checked before anything is built.

Each problem names the key, the value given and what is allowed; `validate.validate` reports them with the rest.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from xtune.config.schema import REWARD_BUILTINS, RunSpec

# `module:function`, the module dotted (a file `module.py` under grpo.reward_path, or an installed module).
FN_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")
# The keyword arguments each builtin takes (methods/grpo_rewards.py).
BUILTIN_ARGS = {
    "exact": ("field", "normalize"),
    "regex": ("field", "pattern", "compare", "normalize", "tolerance"),
    "math": ("field",),
    "format": ("pattern",),
    "length": ("max_tokens", "penalty"),
}


def grpo_problems(spec: RunSpec, *, check_files: bool = True) -> list[str]:
    if spec.method != "grpo":
        return []
    g, problems = spec.grpo, []
    if g.num_generations < 2:
        problems.append(f"grpo.num_generations={g.num_generations}: must be >= 2 (advantages compare the "
                        "completions of one prompt)")
    for key, value, low in (("grpo.num_iterations", g.num_iterations, 1), ("grpo.max_prompt_length", g.max_prompt_length, 1),
                            ("grpo.dynamic_sampling_max_rounds", g.dynamic_sampling_max_rounds, 0)):
        if value < low:
            problems.append(f"{key}={value}: must be >= {low}")
    if not 0.0 < g.epsilon < 1.0:
        problems.append(f"grpo.epsilon={g.epsilon}: must be in (0, 1)")
    if g.epsilon_high is not None and not g.epsilon_high > 0.0:
        problems.append(f"grpo.epsilon_high={g.epsilon_high}: must be > 0 (or null for grpo.epsilon)")
    if not (math.isfinite(g.beta) and g.beta >= 0.0):
        problems.append(f"grpo.beta={g.beta}: must be >= 0 (0: no KL term, no reference)")
    t = spec.train
    if g.num_generations >= 1 and t.global_batch_size % g.num_generations:
        problems.append(f"train.global_batch_size={t.global_batch_size} counts completions and must be a multiple of "
                        f"grpo.num_generations={g.num_generations}")
    if spec.parallel.sp_size > 1:
        problems.append(f"parallel.sp_size={spec.parallel.sp_size}: grpo does not run under sequence parallelism yet; "
                        "use parallel.sp_size=1")
    if spec.data.eval_datasets:
        problems.append("data.eval_datasets: grpo has no eval loss over prompt records; leave it empty (data.eval_datasets=[]) "
                        "and score the model with xtune eval")
    if spec.data.pack == "hard":
        problems.append("data.pack=hard cuts documents, but a completion must stay whole in one row: "
                        "use data.pack=soft, bfd or none")
    gen = spec.gen
    if not gen.temperature > 0:
        problems.append(f"gen.temperature={gen.temperature}: grpo samples its completions; give a temperature > 0 "
                        "(e.g. 1.0): greedy completions of a prompt would all be the same")
    if g.max_prompt_length + gen.max_new_tokens > spec.data.pack_max_length:
        problems.append(f"grpo.max_prompt_length={g.max_prompt_length} + gen.max_new_tokens={gen.max_new_tokens} "
                        f"exceeds data.pack_max_length={spec.data.pack_max_length}: a prompt and its completion must "
                        "fit in one packed row")
    problems.extend(reward_problems(spec, check_files=check_files))
    return problems


def reward_problems(spec: RunSpec, *, check_files: bool = True) -> list[str]:
    g, problems = spec.grpo, []
    if not g.rewards:
        problems.append("grpo.rewards is empty: give at least one reward, e.g. "
                        "grpo.rewards=[{builtin: exact}] or [{fn: my_rewards:brevity}]")
    names = []
    for i, r in enumerate(g.rewards):
        key = f"grpo.rewards[{i}]"
        if (r.fn is None) == (r.builtin is None):
            problems.append(f"{key}: give exactly one of fn (module:function) and builtin "
                            f"({', '.join(REWARD_BUILTINS)}); got fn={r.fn}, builtin={r.builtin}")
            continue
        if r.builtin is not None and r.builtin not in REWARD_BUILTINS:
            problems.append(f"{key}.builtin={r.builtin}: not allowed; choose one of {', '.join(REWARD_BUILTINS)}")
            continue
        if r.fn is not None and not FN_PATTERN.match(r.fn):
            problems.append(f"{key}.fn={r.fn}: expected module:function (e.g. my_rewards:brevity)")
            continue
        if not math.isfinite(r.weight):
            problems.append(f"{key}.weight={r.weight}: must be a finite number")
        if r.builtin is not None:
            problems.extend(_builtin_problems(key, r.builtin, dict(r.args or {})))
        names.append(r.name or r.builtin or r.fn.split(":")[1])
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"grpo.rewards: two rewards are named {name}; give each a distinct name")
    if any(r.fn for r in g.rewards) and g.reward_path is not None and check_files \
            and not Path(g.reward_path).expanduser().is_dir():
        problems.append(f"grpo.reward_path={g.reward_path}: no such folder")
    return problems


def _builtin_problems(key: str, builtin: str, args: dict) -> list[str]:
    allowed = BUILTIN_ARGS[builtin]
    problems = [f"{key}.args.{k}: builtin {builtin} takes no such argument; allowed: {', '.join(allowed)}"
                for k in args if k not in allowed]
    for k in ("pattern",):
        if k in args:
            try:
                re.compile(str(args[k]))
            except re.error as e:
                problems.append(f"{key}.args.{k}={args[k]!r}: not a valid regular expression ({e})")
    if builtin == "format" and "pattern" not in args:
        problems.append(f"{key}: builtin format needs args.pattern (a regex the whole completion must match)")
    if builtin == "length":
        if not isinstance(args.get("max_tokens"), int) or args["max_tokens"] < 1:
            problems.append(f"{key}: builtin length needs args.max_tokens, an integer >= 1 (the budget)")
        if "penalty" in args and not (isinstance(args["penalty"], (int, float)) and args["penalty"] >= 0):
            problems.append(f"{key}.args.penalty={args['penalty']}: must be a number >= 0")
    return problems
