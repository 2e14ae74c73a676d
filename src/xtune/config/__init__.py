"""Configuration: schema (typed run spec), composition (Hydra) and validation."""

from xtune.config.schema import RunSpec  # noqa: F401
