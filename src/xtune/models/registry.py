"""`get_adapter(model_spec)`: the ModelAdapter of `model_spec.family`."""

from __future__ import annotations

import dataclasses

from xtune.config.families import detect_family
from xtune.config.schema import CHOICES
from xtune.errors import XtuneError


def _adapters():
    # Lazy: the families import transformers' model classes (seconds); the commands that only compose and
    # validate a spec (xtune config, --dry-run, configuration errors) import this module without building a model.
    from xtune.models.auto import AutoAdapter
    from xtune.models.intern_s1 import InternS1Adapter
    from xtune.models.qwen3 import Qwen3Adapter
    from xtune.models.qwen3_moe import Qwen3MoeAdapter

    return {a.family: a for a in (AutoAdapter, Qwen3Adapter, Qwen3MoeAdapter, InternS1Adapter)}


FAMILIES = CHOICES["model.family"]


def get_adapter(model_spec):
    """The adapter of the spec's family; `family: null` is resolved from the model type as at compose time."""
    family = detect_family(model_spec)
    if family not in FAMILIES:
        raise XtuneError(f"model.family must be one of {FAMILIES}, got {model_spec.family!r}")
    if family != model_spec.family:
        model_spec = dataclasses.replace(model_spec, family=family)
    return _adapters()[family](model_spec)
