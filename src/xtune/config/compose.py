"""Compose a RunSpec with Hydra: conf/ groups + a recipe + command-line overrides.

Recipes live in `recipes/` (not a Hydra group folder), so each recipe file is registered in
Hydra's ConfigStore as an option of the `recipe` group at the global package. The same holds for
a user's `recipe=./path.yaml` and for `recipes/` folders under `--config-dir` directories.

Before Hydra composes anything, every override is checked against the schema so that all
mistakes are reported together, each with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from xtune.config.io import to_frozen, writable_structured
from xtune.config.resources import assets_dir, conf_dir, recipes_dir
from xtune.config.schema import CHOICES, RunSpec
from xtune.errors import ConfigError

GROUPS = ("model", "data", "optim", "sched", "loss", "parallel")
PRIMARY = "sft"
SCHEMA_NAME = "xtune_schema"


# --------------------------------------------------------------------------- discovery


def _recipe_dirs(config_dirs: Sequence[str]) -> List[Path]:
    dirs = [recipes_dir()]
    for d in config_dirs:
        for sub in ("recipes", "recipe"):
            if (Path(d) / sub).is_dir():
                dirs.append(Path(d) / sub)
    return dirs


def recipe_files(config_dirs: Sequence[str] = ()) -> Dict[str, Path]:
    """Recipe name -> file. A user's folder shadows a packaged recipe of the same name."""
    found: Dict[str, Path] = {}
    for d in _recipe_dirs(config_dirs):
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return found


def group_options(group: str, config_dirs: Sequence[str] = ()) -> List[str]:
    names = set()
    for root in [conf_dir(), *map(Path, config_dirs)]:
        names.update(f.stem for f in (root / group).glob("*.yaml"))
    return sorted(names)


def group_file(group: str, option: str, config_dirs: Sequence[str] = ()) -> Optional[Path]:
    for root in [*map(Path, reversed(list(config_dirs))), conf_dir()]:
        f = root / group / f"{option}.yaml"
        if f.is_file():
            return f
    return None


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------- registration


def _resolve_asset(rel: str) -> str:
    return str(assets_dir() / rel)


# Registered on import: a job that a launcher plugin runs in another process resolves the
# composed config there, and imports this module (through to_spec) before it does.
if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", _resolve_asset)


def setup(config_dirs: Sequence[str] = ()) -> Dict[str, Path]:
    """Register the schema and every recipe with Hydra. Idempotent."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=writable_structured(RunSpec))
    recipes = recipe_files(config_dirs)
    for name, path in recipes.items():
        _store_recipe(name, path)
    return recipes


def _store_recipe(name: str, path: Path) -> None:
    from hydra.core.config_store import ConfigStore

    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax: the parser's message carries the line
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(node, DictConfig):
        raise ConfigError([f"{path}: a recipe must be a YAML mapping"])
    node.recipe = name
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")


def _recipe_path_override(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or os.sep in value


# --------------------------------------------------------------------------- override checks


def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

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
        hint = f" Did you mean '{owners[0]}'?" if len(owners) == 1 else suggest(part, options)
        allowed = f" Keys of {where}: {', '.join(map(str, options))}." if options and not hint else ""
        return f"{key}={given}: unknown key '{part}' in {where}.{hint}{allowed}"
    # The key exists; the unknown one is inside the value (e.g. a list of dataset mappings).
    return f"{key}={given}: {str(error).splitlines()[0]}"


def check_value(key: str, value) -> Optional[str]:
    """Enumerated string fields: the value must be one of the allowed ones."""
    allowed = CHOICES.get(key)
    if allowed is None or not isinstance(value, str) or value.startswith("${"):
        return None
    if value not in allowed:
        return f"{key}={value}: not allowed; choose one of {', '.join(allowed)}.{suggest(value, allowed)}"
    return None


def check_overrides(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> List[str]:
    """Every problem in the command-line overrides, each naming the key, the value and what is allowed.

    Group and recipe choices are checked first; key=value overrides are then checked against the
    config those choices compose to (so list elements such as data.datasets.0.path can be checked),
    or against the bare schema when a choice is itself wrong.
    """
    parsed, problems = _parse(overrides)
    recipes = recipe_files(config_dirs)
    choices, values = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        (choices if key == "recipe" or key in GROUPS else values).append(o)

    for o in choices:
        key = o.key_or_group
        options = list(recipes) if key == "recipe" else group_options(key, config_dirs)
        for v in _values(o):
            if key == "recipe" and _recipe_path_override(str(v)):
                if not Path(v).is_file():
                    problems.append(f"recipe={v}: no such file")
            elif str(v) not in options:
                problems.append(f"{key}={v}: no such {key}; choose one of {', '.join(options)}.{suggest(v, options)}")

    base = writable_structured(RunSpec)
    if not problems and values:
        first_choices = [f"{o.get_key_element()}={_values(o)[0]}" for o in choices]
        try:
            base = _compose_raw(first_choices, config_dirs)
            OmegaConf.set_struct(base, True)
        except Exception:
            pass  # a broken recipe file is reported when composing for real

    for o in values:
        key = o.key_or_group
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


def sweep_points(overrides: Sequence[str]) -> List[List[str]]:
    """Expand sweep overrides (a,b,c / range(...) / choice(...)) into one override list per job."""
    parsed, problems = _parse(overrides)
    if problems:
        raise ConfigError(problems)
    axes: List[List[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def _register_path_recipes(overrides: Sequence[str]) -> List[str]:
    """`recipe=./my.yaml` registers that file under its stem and becomes `recipe=<stem>`."""
    out = []
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "recipe" and value and _recipe_path_override(value) and "," not in value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError([f"recipe={value}: no such file"])
            _store_recipe(path.stem, path.resolve())
            text = f"recipe={path.stem}"
        out.append(text)
    return out


def hydra_overrides(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> List[str]:
    """The override list handed to Hydra: path recipes registered, user config dirs on the search path."""
    out = _register_path_recipes(overrides)
    if config_dirs:
        paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
        out.append(f"hydra.searchpath=[{paths}]")
    return out


# --------------------------------------------------------------------------- compose


def compose(overrides: Sequence[str] = (), config_dirs: Sequence[str] = ()) -> DictConfig:
    """Compose the config (without the hydra node). Raises ConfigError listing every problem."""
    setup(config_dirs)
    problems = check_overrides(overrides, config_dirs)
    if problems:
        raise ConfigError(problems)
    try:
        return _compose_raw(overrides, config_dirs)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own errors: one line each, never a traceback
        raise ConfigError([hydra_error_message(e)]) from None


def _compose_raw(overrides: Sequence[str], config_dirs: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = hydra_overrides(overrides, config_dirs)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="xtune"):
            return hydra_compose(config_name=PRIMARY, overrides=args)
    finally:
        GlobalHydra.instance().clear()


def hydra_error_message(e: BaseException) -> str:
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}: {str(cause).strip()}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:4])


def to_spec(cfg: DictConfig, *, check_files: bool = True, world_size: Optional[int] = None) -> RunSpec:
    """Composed config -> validated RunSpec, or ConfigError with every problem found."""
    from xtune.config.families import resolve_family
    from xtune.config.validate import validate

    cfg = cfg.copy()
    if "hydra" in cfg:
        with open_dict(cfg):
            cfg.pop("hydra")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError([missing_message(k) for k in missing])
    try:
        spec = to_frozen(RunSpec, cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([hydra_error_message(e)]) from None
    # model.family: null becomes the family of load_from's model type before anything reads it.
    spec = dataclasses.replace(spec, model=resolve_family(spec.model))
    problems = validate(spec, check_files=check_files, world_size=world_size)
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


def load_spec(overrides: Sequence[str] = (), config_dirs: Sequence[str] = (), **kw) -> Tuple[DictConfig, RunSpec]:
    cfg = compose(overrides, config_dirs)
    return cfg, to_spec(cfg, **kw)
