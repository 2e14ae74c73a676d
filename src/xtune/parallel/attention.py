"""The one place that chooses the attention implementation of a training model.

Two decisions, both here: which transformers implementation the model is built with (`resolve`: flash-attn's varlen
kernel on CUDA when installed, else sdpa, or what `parallel.attn` names), and what its text decoder is switched to for
packed rows (`switch`): the Ulysses wrapper under sequence parallelism, xtune's per-document sdpa (torch's varlen kernel
on CUDA) on sdpa, else the built implementation. `ops.attention.packed_kwargs` then builds the forward kwargs for the
name `switch` returns.
"""

from __future__ import annotations

import importlib.util

import torch

from xtune.config.schema import CHOICES
from xtune.errors import XtuneError
from xtune.ops import packed_sdpa
from xtune.parallel import ulysses

ATTN_CHOICES = CHOICES["parallel.attn"]


def _flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve(attn: str, device) -> str:
    """Map `parallel.attn` to the transformers `attn_implementation` the model is built with on this device."""
    device = torch.device(device)
    if attn not in ATTN_CHOICES:
        raise XtuneError(f"parallel.attn must be one of {ATTN_CHOICES}, got {attn!r}")
    if attn in ("eager", "sdpa"):
        return attn
    flash_ok = device.type == "cuda" and _flash_available()
    if attn == "flash" and not flash_ok:
        why = "a CUDA device" if device.type != "cuda" else "the flash-attn package (pip install 'xtune[gpu]')"
        raise XtuneError(f"parallel.attn=flash needs {why}; use parallel.attn=sdpa or auto")
    return "flash_attention_2" if flash_ok else "sdpa"


def switch(language_model, impl: str, sp_group=None) -> str:
    """Switch the text decoder (a vision tower keeps its own attention) to what packed rows need; returns the
    implementation name the root's forward passes to `packed_kwargs`."""
    if sp_group is not None:
        ulysses.register(sp_group)
        ulysses.use_on(language_model, impl)
        return ulysses.attn_name(impl)
    if packed_sdpa.use_on(language_model, impl):
        return packed_sdpa.NAME
    return impl
