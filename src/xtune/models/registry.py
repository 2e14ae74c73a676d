"""`get_adapter(model_spec)`: the ModelAdapter of `model_spec.family`."""

from __future__ import annotations

from ..config.families import detect_family
from ..config.schema import CHOICES
from ..errors import XtuneError


def _adapters():
    # Imported lazily: transformers' model modules are slow to import and the CLI must start fast.
    from .auto import AutoAdapter
    from .intern_s1 import InternS1Adapter
    from .qwen3 import Qwen3Adapter
    from .qwen3_moe import Qwen3MoeAdapter

    return {a.family: a for a in (AutoAdapter, Qwen3Adapter, Qwen3MoeAdapter, InternS1Adapter)}


FAMILIES = CHOICES["model.family"]


def get_adapter(model_spec):
    """The adapter of the spec's family; `family: null` is resolved from the model type as at compose time."""
    family = detect_family(model_spec)
    if family not in FAMILIES:
        raise XtuneError(f"model.family must be one of {FAMILIES}, got {model_spec.family!r}")
    if family != model_spec.family:
        import dataclasses

        model_spec = dataclasses.replace(model_spec, family=family)
    return _adapters()[family](model_spec)
