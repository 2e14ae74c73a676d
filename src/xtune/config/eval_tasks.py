"""Eval tasks by name: `conf/eval/NAME.yaml` (or a user's `--config-dir DIR/eval/NAME.yaml`, or a YAML path).

A task file is a Hydra config of the `eval` group at the global package: an `eval:` section (the EvalSpec) and
optionally a `gen:` section (its generation settings). `xtune eval eval=NAME` composes it with Hydra; training
(`train.eval_tasks=[NAME]`) reads the same file here, its `gen` on top of the run's `gen` section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xtune.config.io import to_frozen, writable_structured
from xtune.config.resources import assets_dir, conf_dir
from xtune.config.schema import GenSpec
from xtune.config.schema_eval import EvalSpec
from xtune.errors import ConfigError

GROUP = "eval"

# The same `${asset:...}` resolver as compose.py registers (a task read outside Hydra resolves it too).
if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", lambda rel: str(assets_dir() / rel))


def task_files(config_dirs: Sequence[str] = ()) -> dict[str, Path]:
    """Task name -> file; a user's folder shadows a packaged task of the same name."""
    found: dict[str, Path] = {}
    for root in [conf_dir(), *map(Path, config_dirs)]:
        for f in sorted((root / GROUP).glob("*.yaml")):
            found[f.stem] = f
    return found


def is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name


def task_file(name: str, config_dirs: Sequence[str] = ()) -> Path:
    """The file of a task name or path; ConfigError naming the known tasks when there is none."""
    if is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError([f"eval task {name}: no such file"])
        return path
    files = task_files(config_dirs)
    if name not in files:
        from xtune.config.validate import suggest  # lazy: a cycle (config.validate -> validate_eval -> here)

        raise ConfigError([f"eval task {name}: no such task; choose one of {', '.join(files) or '(none)'} "
                           f"(conf/eval/*.yaml) or give a YAML path.{suggest(name, files)}"])
    return files[name]


def load_task(name: str, gen: GenSpec | None = None, config_dirs: Sequence[str] = ()) -> tuple[EvalSpec, GenSpec]:
    """(EvalSpec, GenSpec) of a task file: its eval section (name defaulting to the task's name) and its gen
    section over `gen`. ConfigError naming the file and key on a wrong key or type."""
    path = task_file(name, config_dirs)
    try:
        node = OmegaConf.load(path)
        if not isinstance(node, DictConfig):
            raise ConfigError([f"{path}: a task file must be a mapping with an eval: section"])
        unknown = [k for k in node if k not in ("eval", "gen", "defaults")]
        if unknown:
            raise ConfigError([f"{path}: unknown section(s) {', '.join(map(str, unknown))}; a task has eval: and gen:"])
        ev = OmegaConf.merge(writable_structured(EvalSpec), node.get("eval") or {})
        base = dataclasses.asdict(gen or GenSpec())
        gn = OmegaConf.merge(writable_structured(GenSpec), base, node.get("gen") or {})
        espec, gspec = to_frozen(EvalSpec, ev), to_frozen(GenSpec, gn)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{path}: {str(e).splitlines()[0]}"]) from None
    if espec.name is None:
        espec = dataclasses.replace(espec, name=Path(name).stem)
    return espec, gspec


def task_name(espec: EvalSpec, fallback: str | None = None) -> str:
    """The task's name: eval.name, else `fallback` (the group option), else the data file's stem."""
    if espec.name:
        return espec.name
    if fallback:
        return fallback
    if espec.data.path:
        return Path(espec.data.path.rstrip("/")).stem or "task"
    return "task"
