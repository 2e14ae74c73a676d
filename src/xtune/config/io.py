"""Read and write a resolved RunSpec as YAML (the run directory's config.yaml)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xtune.config.schema import RunSpec


def writable_structured(cls) -> DictConfig:
    """A structured config for a frozen dataclass that Hydra can still merge overrides into.

    OmegaConf marks every node built from a frozen dataclass read-only (list elements included),
    which would refuse overrides such as data.datasets.0.path=...; so OmegaConf sees a non-frozen
    twin with the same fields, types and defaults, and `to_frozen` converts back afterwards.
    """
    return OmegaConf.structured(_unfrozen(cls))


@functools.cache
def _unfrozen(cls):
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = _map_type(hints[f.name])
        default = {}
        if f.default is not dataclasses.MISSING:
            default["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            factory = f.default_factory
            default["default_factory"] = _unfrozen(factory) if dataclasses.is_dataclass(factory) else factory
        fields.append((f.name, tp, dataclasses.field(**default)))
    return dataclasses.make_dataclass(cls.__name__, fields)


def _map_type(tp):
    if dataclasses.is_dataclass(tp):
        return _unfrozen(tp)
    args = typing.get_args(tp)
    if args:
        mapped = tuple(_map_type(a) for a in args)
        origin = typing.get_origin(tp)
        # typing's generics on purpose: the twin is for OmegaConf, which reads typing.List/Dict/Union.
        if origin in (typing.Union, types.UnionType):  # Optional[int] or int | None
            return typing.Union[mapped]  # noqa: UP007
        generic = {list: typing.List, dict: typing.Dict}.get(origin, origin)  # noqa: UP006
        return generic[mapped if len(mapped) > 1 else mapped[0]]
    return tp


def to_frozen(cls, value):
    """A composed config (or its to_object twin) -> the frozen dataclass `cls`, recursively."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    elif dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return _build(cls, value)


def _build(tp, value):
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        hints = typing.get_type_hints(tp)
        return tp(**{k: _build(hints[k], v) for k, v in value.items()})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _build(inner[0], value)
    if origin is list and value is not None:
        return [_build(args[0], v) for v in value]
    return value


def spec_to_dict(spec: RunSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_to_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(spec_to_dict(spec)))


def spec_from_dict(values: dict) -> RunSpec:
    return to_frozen(RunSpec, OmegaConf.merge(writable_structured(RunSpec), values))


def spec_from_yaml(path: str | Path) -> RunSpec:
    return spec_from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
