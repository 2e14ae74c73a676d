"""The one gate every command that takes overrides passes: compose -> validate -> load checks.

`gate(command, overrides, config_dirs)` composes each job with Hydra's compose API, validates it into a
frozen RunSpec and, at the `load` stage, loads the run's tokenizer the checked way (its folder, its files,
its ids against the model's vocabulary). Whatever a user got wrong surfaces here as an XtuneError (exit 2)
before the command does its own work, so `xtune sft`, `dpo`, `data inspect`, `config show` and the
commands that come later (eval, chat, grpo) report the same input the same way.

Stages, each including the ones before it:
  compose   the overrides parse, the recipe and groups exist, every key is known (`config show`, `--cfg`)
  validate  the RunSpec's values, cross-field rules and files (`--dry-run`, sweeps before Hydra starts)
  load      the tokenizer loads and fits the model (`sft`, `dpo`, `data inspect`, `eval`, `chat`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from xtune.config.compose import Job, compose_jobs, without_hydra
from xtune.config.schema import RunSpec
from xtune.errors import ConfigError

STAGES = ("compose", "validate", "load")


@dataclass(frozen=True)
class Admitted:
    """What passed the gate: one job per sweep point (one without -m) and, at the load stage, the tokenizer
    of the first job."""

    jobs: list[Job]
    tokenizer: Any = None

    @property
    def spec(self) -> RunSpec:
        """The first (without -m: the only) job's validated spec."""
        spec = self.jobs[0].spec
        if spec is None:
            raise ValueError("gate(stage='compose') validates nothing: there is no RunSpec")
        return spec

    @property
    def cfg(self) -> DictConfig:
        """The first job's composed config, without Hydra's node."""
        return without_hydra(self.jobs[0].cfg)


def gate(command: str | None, overrides: Sequence[str], config_dirs: Sequence[str] = (), *,
         stage: str = "load", multirun: bool = False, check_files: bool = True) -> Admitted:
    """Compose, validate and load-check a command line. Raises XtuneError (ConfigError: every problem
    found) for anything the user can fix. `command` names the primary config (sft, dpo, ...); None lets
    the recipe's `method` decide (`data inspect` reads either kind of data)."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage}: one of {', '.join(STAGES)}")
    jobs = compose_jobs(command, overrides, config_dirs, multirun=multirun, validate=stage != "compose",
                        check_files=check_files)
    if stage != "load":
        return Admitted(jobs)
    return Admitted(jobs, tokenizer=_load_checks(jobs))


def _load_checks(jobs: list[Job]) -> Any:
    """Each distinct model section's tokenizer loads (once) and fits its vocabulary; returns the first's."""
    # Lazy: these import torch and transformers, which the compose and validate stages (config show,
    # --cfg, --dry-run) do not need.
    from xtune.models import get_adapter
    from xtune.models.tokenizer_check import load_checked_tokenizer

    specs = [job.spec for job in jobs if job.spec is not None]
    loaded: dict[str, Any] = {}
    problems: list[str] = []
    for spec in specs:
        key = repr(spec.model)  # the spec holds dicts (model.arch): not hashable
        if key in loaded:
            continue
        try:
            loaded[key] = load_checked_tokenizer(get_adapter(spec.model))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return loaded[repr(specs[0].model)]
