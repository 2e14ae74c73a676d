"""The rewards of `xtune grpo` (`grpo.rewards`): builtins and user functions, scored over a batch of completions.

Builtins (`builtin:`):
- `exact`, `regex`, `math`: the scorers of `xtune eval` by the same names (`xtune.eval.scorers.score_text`), the
  completion against the record's `answer` field (`args.field` names another); `args` are the scorer's options
  (`pattern`, `compare`, `normalize`, `tolerance`);
- `format`: 1 when `args.pattern` (a regex) matches the whole completion (e.g. a think/answer layout), else 0;
- `length`: a penalty `-args.penalty x (tokens over args.max_tokens)` (penalty default 1 / max_tokens: a completion
  twice the budget gets -1), 0 within the budget.
User functions (`fn: module:function`): `function(prompts, completions, **fields, **args) -> list[float]`, one call per
batch; `fields` are the records' extra columns (e.g. `answer`), one list entry per completion. The module is
imported with `grpo.reward_path` on sys.path for that import alone.

A reward that raises, returns the wrong number of values or a non-finite one stops the run with an XtuneError
(exit 2) naming the reward's function and the record (its source file:line).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xtune.errors import ConfigError, XtuneError
from xtune.eval.scorers import score_text

SCORERS = ("exact", "regex", "math")


@dataclass
class Batch:
    """What rewards see of a batch of completions (one entry per completion, groups next to each other)."""

    prompts: list[object]  # the prompt as the record gave it (a string or a list of messages)
    completions: list[str]
    lengths: list[int]  # completion tokens
    fields: dict[str, list[object]]  # the records' extra columns
    sources: list[str]  # where each completion's record came from (file:line), for error messages


@dataclass
class Reward:
    name: str
    weight: float
    label: str  # what error messages call it: `builtin exact` or `fn my_rewards:brevity`
    call: Callable[[Batch], Sequence[float]]


def _scorer(name: str, args: dict) -> Callable[[Batch], list[float]]:
    field = args.pop("field", "answer")

    def call(b: Batch) -> list[float]:
        if field not in b.fields:
            raise KeyError(f"the records have no field {field!r} (fields: {', '.join(sorted(b.fields)) or 'none'})")
        return [score_text(name, c, str(ref), **args) for c, ref in zip(b.completions, b.fields[field])]

    return call


def _format(args: dict) -> Callable[[Batch], list[float]]:
    pattern = re.compile(str(args["pattern"]), re.DOTALL)
    return lambda b: [float(pattern.fullmatch(c) is not None) for c in b.completions]


def _length(args: dict) -> Callable[[Batch], list[float]]:
    budget = int(args["max_tokens"])
    penalty = float(args.get("penalty", 1.0 / budget))
    return lambda b: [-penalty * max(0, n - budget) for n in b.lengths]


def load_function(ref: str, reward_path: str | None) -> Callable:
    """`module:function`, imported with `reward_path` on sys.path for that import only (ConfigError when missing)."""
    module_name, _, fn_name = ref.partition(":")
    path = str(Path(reward_path).expanduser().resolve()) if reward_path else None
    if path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name.split(".")[0]):
            where = f"in grpo.reward_path={reward_path} or " if reward_path else ""
            raise ConfigError([f"grpo.rewards fn={ref}: no module {module_name!r} {where}on the import path"
                               + ("" if reward_path else " (set grpo.reward_path=DIR)")]) from None
        raise
    except Exception as e:  # the user's module failed while importing
        raise XtuneError(f"grpo.rewards fn={ref}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    finally:
        if path and path in sys.path:
            sys.path.remove(path)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError([f"grpo.rewards fn={ref}: module {module_name} ({getattr(module, '__file__', '?')}) has "
                           f"no function {fn_name!r}"])
    return fn


def _user(fn: Callable, args: dict) -> Callable[[Batch], Sequence[float]]:
    return lambda b: fn(list(b.prompts), list(b.completions), **b.fields, **args)


def build_rewards(grpo) -> list[Reward]:
    """The rewards of a GrpoSpec (validated by config.validate_grpo), user modules imported now."""
    out = []
    for r in grpo.rewards:
        args = dict(r.args or {})
        if r.builtin is not None:
            label, name = f"builtin {r.builtin}", r.name or r.builtin
            call = _scorer(r.builtin, args) if r.builtin in SCORERS else \
                _format(args) if r.builtin == "format" else _length(args)
        else:
            label, name = f"fn {r.fn}", r.name or r.fn.split(":")[1]
            call = _user(load_function(r.fn, grpo.reward_path), args)
        out.append(Reward(name, float(r.weight), label, call))
    return out


def score(rewards: list[Reward], batch: Batch) -> torch.Tensor:
    """[B, len(rewards)] float64, unweighted; XtuneError naming the reward and the record on any bad value."""
    n = len(batch.completions)
    cols = []
    for r in rewards:
        try:
            values = r.call(batch)
        except Exception as e:  # noqa: BLE001 (the user's code: any error stops the run with its name)
            raise XtuneError(f"reward {r.name} ({r.label}) raised {type(e).__name__}: {e} "
                             f"(batch of {n} completions, first record {batch.sources[0]})") from e
        values = list(values) if not isinstance(values, (str, bytes)) and hasattr(values, "__len__") else values
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            raise XtuneError(f"reward {r.name} ({r.label}) returned {got} for {n} completions: return one number "
                             f"per completion (first record {batch.sources[0]})")
        col = []
        for i, v in enumerate(values):
            x = float(v) if isinstance(v, numbers.Real) or torch.is_tensor(v) and v.numel() == 1 else None
            if x is None or not math.isfinite(x):
                raise XtuneError(f"reward {r.name} ({r.label}) returned {v!r} for completion {i} of record "
                                 f"{batch.sources[i]}: rewards must be finite numbers")
            col.append(x)
        cols.append(col)
    return torch.tensor(cols, dtype=torch.float64).t().reshape(n, len(rewards))


def total(rewards: list[Reward], per_reward: torch.Tensor) -> torch.Tensor:
    """[B] the weighted sum of the rewards."""
    weights = torch.tensor([r.weight for r in rewards], dtype=per_reward.dtype)
    return per_reward @ weights
