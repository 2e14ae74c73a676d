"""Read a recipe file the safe way: a recipe is a YAML mapping, and anything else (a list, a plain scalar,
a binary file, /etc/passwd) is refused in one line that names the path and never echoes the content."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from xtune.errors import ConfigError


def load_recipe_file(path: Path) -> DictConfig:
    """The recipe at `path` as a DictConfig; ConfigError naming the path when it is not a YAML mapping."""
    not_mapping = f"{path}: a recipe must be a YAML mapping of config keys (e.g. 'optim: {{lr: 1e-4}}'); this file is not one"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([not_mapping + " (not UTF-8 text)"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the recipe ({e.strerror})"]) from None
    try:
        # The shape only (OmegaConf.load would turn a plain scalar into a mapping with the text as its key).
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:  # YAML syntax: the parser's message carries the line
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or 'syntax error'}"]) from None
    node = OmegaConf.load(path) if isinstance(raw, dict) else None
    if not isinstance(node, DictConfig):
        raise ConfigError([not_mapping])
    return node
