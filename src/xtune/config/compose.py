"""Compose a RunSpec with Hydra: conf/ groups + a recipe + command-line overrides.

Recipes live in `recipes/` (not a Hydra group folder), so each recipe file is registered in
Hydra's ConfigStore as an option of the `recipe` group at the global package. The same holds for
a user's `recipe=./path.yaml` and for `recipes/` folders under `--config-dir` directories.

`compose_jobs` is the one path from a command line to validated RunSpecs: the overrides are parsed
once, each job (one, or one per sweep point) is composed once with Hydra's compose API and validated
once. Only when Hydra refuses an override are the overrides diagnosed one by one, so that every
mistake is reported together, each with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from xtune.config import validate as rules
from xtune.config.families import resolve_family
from xtune.config.io import to_frozen, writable_structured
from xtune.config.recipe_file import load_recipe_file
from xtune.config.resources import assets_dir, conf_dir, recipes_dir
from xtune.config.schema import RunSpec
from xtune.config.validate import check_value, suggest
from xtune.errors import ConfigError

GROUPS = ("model", "data", "optim", "sched", "loss", "parallel", "peft", "gen", "grpo")
# Command -> its primary config in conf/ (a new command, e.g. dpo, adds its line and its conf/<name>.yaml).
PRIMARY = {"sft": "sft", "dpo": "dpo", "grpo": "grpo"}
SCHEMA_NAME = "xtune_schema"


# --------------------------------------------------------------------------- discovery


def _recipe_dirs(config_dirs: Sequence[str]) -> list[Path]:
    dirs = [recipes_dir()]
    for d in config_dirs:
        for sub in ("recipes", "recipe"):
            if (Path(d) / sub).is_dir():
                dirs.append(Path(d) / sub)
    return dirs


def recipe_files(config_dirs: Sequence[str] = ()) -> dict[str, Path]:
    """Recipe name -> file. A user's folder shadows a packaged recipe of the same name."""
    found: dict[str, Path] = {}
    for d in _recipe_dirs(config_dirs):
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return found


def group_options(group: str, config_dirs: Sequence[str] = ()) -> list[str]:
    names = set()
    for root in [conf_dir(), *map(Path, config_dirs)]:
        names.update(f.stem for f in (root / group).glob("*.yaml"))
    return sorted(names)


# --------------------------------------------------------------------------- registration


def _resolve_asset(rel: str) -> str:
    return str(assets_dir() / rel)


# Registered on import: a job that a launcher plugin runs in another process resolves the
# composed config there, and imports this module (through to_spec) before it does.
if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", _resolve_asset)


def setup(config_dirs: Sequence[str] = ()) -> dict[str, Path]:
    """Register the schema and every recipe with Hydra. Idempotent."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=writable_structured(RunSpec))
    recipes = recipe_files(config_dirs)
    for name, path in recipes.items():
        _store_recipe(name, path)
    return recipes


def _store_recipe(name: str, path: Path) -> None:
    node = load_recipe_file(path)
    node.recipe = name
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")


def _recipe_path_override(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or os.sep in value


# --------------------------------------------------------------------------- override checks


def _parse(overrides: Sequence[str]):
    parser = OverridesParser.create()
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as e:
            problems.append(f"cannot parse override '{text}': {str(e).splitlines()[0]}")
    return parsed, problems


def _values(override) -> list:
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def _unknown_key_problem(base: DictConfig, key: str, given, error: Exception) -> str:
    node, walked = base, []
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node, walked = node[part], walked + [part]
            continue
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node, walked = node[int(part)], walked + [part]
            continue
        where = ".".join(walked) or "the top level"
        options = list(node.keys()) if isinstance(node, DictConfig) else []
        # A section's key given at the top level (lr -> optim.lr) beats a near spelling (seed -> sched).
        owners = [f"{sec}.{part}" for sec in options
                  if not walked and isinstance(node.get(sec), DictConfig) and part in node[sec]]
        others = "".join(f" (or '{o}')" for o in owners[1:])  # seed: train.seed, then gen.seed
        hint = f" Did you mean '{owners[0]}'?{others}" if owners else suggest(part, options)
        allowed = f" Keys of {where}: {', '.join(map(str, options))}." if options and not hint else ""
        return f"{key}={given}: unknown key '{part}' in {where}.{hint}{allowed}"
    # The key exists; the unknown one is inside the value (e.g. a list of dataset mappings).
    return f"{key}={given}: {str(error).splitlines()[0]}"


def _choice_problems(parsed, config_dirs: Sequence[str]) -> list[str]:
    """Group and recipe choices, checked against the files (no composition needed)."""
    problems = []
    recipes = recipe_files(config_dirs)
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or not (key == "recipe" or key in GROUPS):
            continue
        options = list(recipes) if key == "recipe" else group_options(key, config_dirs)
        for v in _values(o):
            if key == "recipe" and _recipe_path_override(str(v)):
                if not Path(v).expanduser().is_file():
                    problems.append(f"recipe={v}: no such file")
            elif str(v) not in options:
                problems.append(f"{key}={v}: no such {key}; choose one of {', '.join(options)}.{suggest(v, options)}")
    return problems


def _value_problems(parsed, base: DictConfig) -> list[str]:
    """key=value overrides tried one by one on `base`: unknown keys, wrong types, values not allowed."""
    problems = []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete() or key == "recipe" or key in GROUPS:
            continue
        for v in _values(o):
            # Echo the value as typed (1e-4, not 0.0001), except for one point of a sweep.
            shown = v if o.is_sweep_override() else o.input_line.partition("=")[2]
            try:
                OmegaConf.update(base.copy(), key, v, merge=True, force_add=o.is_force_add())
            except (ConfigKeyError, ConfigAttributeError) as e:
                problems.append(_unknown_key_problem(base, key, shown, e))
                break
            except OmegaConfBaseException as e:
                problems.append(f"{key}={shown}: {str(e).splitlines()[0]}")
                continue
            msg = check_value(key, v)
            if msg:
                problems.append(msg)
    return problems


def _added_key_problems(parsed) -> list[str]:
    """`+key=value` / `++key=value` may add a key only inside a free-form mapping (model.arch, ...): a key
    the schema does not have is reported as any unknown key is, with the nearest known one."""
    problems = []
    for o in parsed:
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or key.startswith("hydra") or key == "recipe" or key in GROUPS:
            continue
        tp = RunSpec
        for part in key.split("."):
            if not dataclasses.is_dataclass(tp):
                break  # inside a mapping or a list of the schema: any key goes
            hints = typing.get_type_hints(tp)
            if part not in hints:
                problems.append(_unknown_key_problem(writable_structured(RunSpec), key,
                                                     o.input_line.partition("=")[2], KeyError(part)))
                break
            tp = hints[part]
    return problems


def _diagnose(parsed, args: Sequence[str], primary: str, error: Exception) -> list[str]:
    """Hydra refused a job's overrides (it stops at the first): find every bad one. The error path only:
    the values are tried on the config the group and recipe choices compose to."""
    choices = [a for a in args if a.partition("=")[0] in ("recipe", *GROUPS) or a.startswith("hydra.searchpath")]
    try:
        base = _compose_raw(choices, primary)
        OmegaConf.set_struct(base, True)
    except Exception:
        return [hydra_error_message(error)]  # a broken recipe or group file: Hydra's message names it
    return _value_problems(parsed, base) or [hydra_error_message(error)]


def _job_args(parsed, config_dirs: Sequence[str]) -> list[list[str]]:
    """One Hydra override list per job: sweeps expanded, path recipes registered, user dirs on the search path."""
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([_register_path_recipe(o.input_line)])
    search = _search_path(config_dirs)
    return [list(p) + search for p in itertools.product(*axes)]


def _register_path_recipe(text: str) -> str:
    """`recipe=./my.yaml` registers that file under its stem and becomes `recipe=<stem>`."""
    key, _, value = text.partition("=")
    if key.strip() == "recipe" and value and _recipe_path_override(value):
        path = Path(value).expanduser()
        _store_recipe(path.stem, path.resolve())
        return f"recipe={path.stem}"
    return text


def _search_path(config_dirs: Sequence[str]) -> list[str]:
    if not config_dirs:
        return []
    return [f"hydra.searchpath=[{','.join(f'file://{Path(d).resolve()}' for d in config_dirs)}]"]


def hydra_overrides(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> list[str]:
    """The override list handed to Hydra's own main (a sweep): path recipes registered, user dirs searched."""
    return [_register_path_recipe(o) for o in overrides] + _search_path(config_dirs)


def primary_config(command: str) -> str:
    if command not in PRIMARY:
        raise ConfigError([f"no configuration for command '{command}'; known: {', '.join(PRIMARY)}"])
    return PRIMARY[command]


# --------------------------------------------------------------------------- compose


@dataclass(frozen=True)
class Job:
    """One job of a command line: its overrides (as given to Hydra), composed config and validated spec."""

    overrides: list[str]
    cfg: DictConfig
    spec: RunSpec | None


def sweep_problems(parsed, multirun: bool) -> list[str]:
    """A sweep (several values for a key) needs -m; shared by every command that composes jobs."""
    sweeps = [o.key_or_group for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        return [f"{', '.join(sweeps)}: several values given (a sweep); add -m/--multirun to run one job per value"]
    return []


def compose_jobs(command: str | None, overrides: Sequence[str], config_dirs: Sequence[str] = (), *,
                 multirun: bool = False, validate: bool = True, check_files: bool = True,
                 world_size: int | None = None) -> list[Job]:
    """Parse once, compose each job once, validate each once. Raises ConfigError with every problem found.

    `multirun` allows sweeps (one job per point); `validate=False` composes only (for --cfg and config show).
    `command=None`: the recipe's `method` picks the primary config (data inspect reads either kind of data).
    """
    primary = primary_config(command or "sft")
    setup(config_dirs)
    parsed, problems = _parse(overrides)
    problems += _choice_problems(parsed, config_dirs) + _added_key_problems(parsed)
    if problems:  # the choices do not compose: try the values on the bare schema
        problems += _value_problems(parsed, writable_structured(RunSpec))
    problems += sweep_problems(parsed, multirun)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))

    jobs, problems = [], []
    points = _job_args(parsed, config_dirs)
    for args in points:
        try:
            cfg = _compose_raw(args, primary)
            method = str(cfg.get("method"))
            if command is None and validate and PRIMARY.get(method, primary) != primary:
                cfg = _compose_raw(args, PRIMARY[method])
        except Exception as e:
            raise ConfigError(list(dict.fromkeys(_diagnose(parsed, args, primary, e)))) from None
        try:
            spec = to_spec(cfg, check_files=check_files, world_size=world_size) if validate else None
        except ConfigError as e:
            user = [a for a in args if not a.startswith("hydra.searchpath")]
            prefix = f"[{' '.join(user)}] " if len(points) > 1 else ""
            problems.extend(prefix + p for p in e.problems)
            continue
        if spec is not None and command is not None and spec.method != command and command in PRIMARY:
            problems.append(f"recipe {spec.recipe} trains with method {spec.method}: run `xtune {spec.method} "
                            f"recipe={spec.recipe}` (or set method={command} with data of that kind)")
            continue
        jobs.append(Job(args, cfg, spec))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return jobs


def compose(overrides: Sequence[str] = (), config_dirs: Sequence[str] = (), command: str = "sft") -> DictConfig:
    """Compose one job's config (without the hydra node). Raises ConfigError listing every problem."""
    return without_hydra(compose_jobs(command, overrides, config_dirs, validate=False)[0].cfg)


def _compose_raw(args: Sequence[str], primary: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="xtune"):
            return hydra_compose(config_name=primary, overrides=list(args), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def hydra_error_message(e: BaseException) -> str:
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}: {str(cause).strip()}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:4])


def without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    if "hydra" in cfg:
        with open_dict(cfg):
            cfg.pop("hydra")
    return cfg


def to_spec(cfg: DictConfig, *, check_files: bool = True, world_size: int | None = None,
            validate: bool = True) -> RunSpec:
    """Composed config -> validated RunSpec, or ConfigError with every problem found.
    `validate=False` only freezes: for a sweep's job, whose point was validated before Hydra started it."""
    cfg = without_hydra(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([missing_message(k) for k in missing])
    try:
        spec = to_frozen(RunSpec, cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([hydra_error_message(e)]) from None
    # model.family: null becomes the family of load_from's model type before anything reads it.
    spec = dataclasses.replace(spec, model=resolve_family(spec.model))
    problems = rules.validate(spec, check_files=check_files, world_size=world_size) if validate else []
    if problems:
        raise ConfigError(problems)
    return spec


def missing_message(key: str) -> str:
    if key == "model.load_from":
        return (
            "model.load_from is required for this model: give the Hugging Face folder with its weights, "
            "e.g. model.load_from=/models/Intern-S1-mini (or pick a tiny model, e.g. model=intern_s1_tiny, "
            "for a random-init trial)"
        )
    return f"{key} is required but has no value: set {key}=..."


def load_spec(overrides: Sequence[str] = (), config_dirs: Sequence[str] = (), *, command: str | None = None,
              **kw) -> tuple[DictConfig, RunSpec]:
    """One job's config and spec. Without `command` (data inspect, tests) the recipe's method decides."""
    job = compose_jobs(command, overrides, config_dirs, **kw)[0]
    return without_hydra(job.cfg), job.spec
