"""Read and write a resolved RunSpec as YAML (the run directory's config.yaml)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from xtune.config.schema import RunSpec


def writable_structured(cls) -> DictConfig:
    """A structured config of a frozen dataclass that can still be merged into.

    OmegaConf marks every node of a frozen dataclass read-only, which would refuse overrides;
    the type checks and the unknown-key checks stay, and `to_object` still builds frozen objects.
    """
    cfg = OmegaConf.structured(cls)
    _clear_readonly(cfg)
    return cfg


def _clear_readonly(node) -> None:
    node._set_flag("readonly", None)
    if isinstance(node, (DictConfig, ListConfig)):
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            _clear_readonly(node._get_node(key))


def spec_to_dict(spec: RunSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_to_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(spec_to_dict(spec)))


def spec_from_dict(values: dict) -> RunSpec:
    merged = OmegaConf.merge(writable_structured(RunSpec), values)
    return OmegaConf.to_object(merged)


def spec_from_yaml(path: Union[str, Path]) -> RunSpec:
    return spec_from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
