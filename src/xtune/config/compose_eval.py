"""Compose `xtune eval`'s jobs: conf/evaluate.yaml (the eval, gen and harness sections) + the `eval` group's task +
overrides, with the same parsing, sweep expansion and error reporting as the training commands (compose.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xtune.config import compose as C
from xtune.config.eval_tasks import GROUP, task_files, task_name
from xtune.config.io import to_frozen, writable_structured
from xtune.config.schema_eval import EvalRunSpec
from xtune.config.validate import suggest
from xtune.config.validate_eval import eval_run_problems
from xtune.errors import ConfigError

PRIMARY = "evaluate"
SCHEMA_NAME = "xtune_eval_schema"


@dataclasses.dataclass(frozen=True)
class EvalJob:
    overrides: list[str]
    cfg: DictConfig
    spec: EvalRunSpec | None


def setup(config_dirs: Sequence[str] = ()) -> None:
    C.setup(config_dirs)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=writable_structured(EvalRunSpec))


def _task_choice_problems(parsed, config_dirs: Sequence[str]) -> list[str]:
    tasks = task_files(config_dirs)
    problems = []
    for o in parsed:
        if o.key_or_group != GROUP or o.is_delete():
            continue
        for v in C._values(o):
            if str(v) not in tasks and v is not None:
                problems.append(f"eval={v}: no such eval task; choose one of {', '.join(tasks)} (conf/eval/*.yaml), "
                                f"or set eval.data.path=FILE for a one-off task.{suggest(v, tasks)}")
    return problems


def to_eval_spec(cfg: DictConfig, *, check_files: bool = True) -> EvalRunSpec:
    """Composed config -> validated EvalRunSpec (eval.name filled in from the task option), or ConfigError."""
    option = None
    choices = cfg.get("hydra", {}).get("runtime", {}).get("choices", {}) if "hydra" in cfg else {}
    if choices:
        option = choices.get(GROUP)
    cfg = C.without_hydra(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([C.missing_message(k) for k in missing])
    try:
        spec = to_frozen(EvalRunSpec, cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([C.hydra_error_message(e)]) from None
    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, name=task_name(spec.eval, option)))
    problems = eval_run_problems(spec, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return spec


def compose_eval_jobs(overrides: Sequence[str], config_dirs: Sequence[str] = (), *, multirun: bool = False,
                      validate: bool = True, check_files: bool = True) -> list[EvalJob]:
    """One validated EvalRunSpec per job (one, or one per sweep point); ConfigError with every problem found."""
    setup(config_dirs)
    parsed, problems = C._parse(overrides)
    problems += _task_choice_problems(parsed, config_dirs)
    problems += C.sweep_problems(parsed, multirun)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    jobs, problems = [], []
    points = C._job_args(parsed, config_dirs)
    for args in points:
        try:
            cfg = C._compose_raw(args, PRIMARY)
        except Exception as e:  # noqa: BLE001 (Hydra's errors: diagnosed key by key)
            base = C._compose_raw([a for a in args if a.partition("=")[0] == GROUP or a.startswith("hydra.")], PRIMARY)
            OmegaConf.set_struct(base, True)
            raise ConfigError(list(dict.fromkeys(C._value_problems(parsed, base) or [C.hydra_error_message(e)]))) \
                from None
        try:
            spec = to_eval_spec(cfg, check_files=check_files) if validate else None
        except ConfigError as e:
            prefix = f"[{' '.join(a for a in args if not a.startswith('hydra.'))}] " if len(points) > 1 else ""
            problems.extend(prefix + p for p in e.problems)
            continue
        jobs.append(EvalJob(args, cfg, spec))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return jobs
