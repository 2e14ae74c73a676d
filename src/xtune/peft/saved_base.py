"""The frozen base of an adapter run: where it comes from when the run started from random weights.

A checkpoint of an adapter run holds only the trained weights; the base is reloaded from model.load_from.
A random-init base cannot be reloaded, so the run writes it once as a Hugging Face folder <run_dir>/base,
and resume and `xtune export` then read it exactly like a load_from folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from xtune.config.schema import RunSpec
from xtune.peft.lora import base_key, enabled, is_adapter_key

BASE_DIR = "base"


def saved_base_dir(run_dir) -> Path:
    return Path(run_dir) / BASE_DIR


def base_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights, under its own key names, from a full state dict of the adapted model."""
    return {base_key(k): v for k, v in full.items() if not is_adapter_key(k)}


def with_saved_base(spec: RunSpec, run_dir):
    """`spec` with model.load_from pointing at <run_dir>/base when this adapter run saved its random-init base."""
    folder = saved_base_dir(run_dir)
    if enabled(spec.peft) and not spec.model.load_from and (folder / "config.json").is_file():
        return dataclasses.replace(spec, model=dataclasses.replace(spec.model, load_from=str(folder)))
    return spec
