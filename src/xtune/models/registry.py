"""`get_adapter(model_spec)`: the ModelAdapter of `model_spec.family`."""

from __future__ import annotations

from ..config.schema import CHOICES
from ..errors import XtuneError


def _adapters():
    # Imported lazily: transformers' model modules are slow to import and the CLI must start fast.
    from .intern_s1 import InternS1Adapter
    from .qwen3 import Qwen3Adapter
    from .qwen3_moe import Qwen3MoeAdapter

    return {a.family: a for a in (Qwen3Adapter, Qwen3MoeAdapter, InternS1Adapter)}


FAMILIES = CHOICES["model.family"]


def get_adapter(model_spec):
    if model_spec.family not in FAMILIES:
        raise XtuneError(f"model.family must be one of {FAMILIES}, got {model_spec.family!r}")
    return _adapters()[model_spec.family](model_spec)
