"""Resuming with a changed configuration: what changed, what can be honoured, what must be refused.

A checkpoint keeps the resolved spec it was trained with (in state.json). On resume the new spec is
compared with it key by key:
- keys that define the run (the model, the data and its packing, the seed, the global batch: the data
  position is a step count over a fixed global order) cannot change mid-run: refused with exit 2;
- the schedule (train.max_steps / epochs, optim.lr, sched.*) is rebuilt for the new total from the
  current step, and the other optimizer settings replace the checkpoint's;
- everything else (logging, save/eval cadence, the parallel layout, ...) simply applies.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from xtune.config.io import spec_to_dict
from xtune.config.schema import RunSpec

# Keys that may change inside a refused section without changing the run.
_HARMLESS = ("data.num_workers", "data.cache_dir")
_REFUSED = ("recipe", "description", "model.", "data.", "train.seed", "train.global_batch_size")
_SCHEDULE = ("train.max_steps", "train.epochs", "optim.lr", "sched.")
_IGNORED = ("train.resume", "train.work_dir")


class Changes(NamedTuple):
    lines: list[str]  # "key: old -> new" for every changed key
    refused: list[str]
    schedule: bool  # the LR schedule must be rebuilt
    optim: bool  # optimizer settings other than the LR changed


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def compare(saved: dict, spec: RunSpec) -> Changes:
    """`saved`: the checkpoint's spec (as spec_to_dict wrote it); `spec`: this run's RunSpec."""
    # Through JSON as state.json was: tuples become lists on both sides.
    old, new = flatten(saved), flatten(json.loads(json.dumps(spec_to_dict(spec))))
    lines, refused, schedule, optim = [], [], False, False
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b or _matches(key, _IGNORED):
            continue
        if _matches(key, _REFUSED) and not _matches(key, _HARMLESS):
            refused.append(f"{key}: {a!r} -> {b!r}")
            lines.append(f"{key}: {a!r} -> {b!r} (cannot change mid-run)")
        elif _matches(key, _SCHEDULE):
            schedule = True
            lines.append(f"{key}: {a!r} -> {b!r} (the LR schedule is rebuilt)")
        else:
            optim = optim or key.startswith("optim.")
            lines.append(f"{key}: {a!r} -> {b!r}")
    return Changes(lines, refused, schedule, optim)


def refusal(ckpt, changes: Changes) -> list[str]:
    """ConfigError problems for the keys that cannot change on resume (empty when none)."""
    return [f"train.resume: {ckpt} was trained with another value of {r}; this key cannot change when "
            "resuming (start a new run in another train.work_dir, or restore the value)" for r in changes.refused]
