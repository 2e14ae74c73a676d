"""Which model family a ModelSpec means, decided from config files alone (no transformers import).

`model.family: null` (the schema default) is resolved here, at compose time: the `model_type` of
`load_from`'s config.json (or of `model.arch` for a random init) picks its tuned family, and any other
causal LM gets the generic `auto` family. The list of families itself is `CHOICES["model.family"]`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from xtune.config.schema import CHOICES, ModelSpec

# config.json `model_type` values each tuned family reads (InternVL folders: transformers' own layout).
TUNED_MODEL_TYPES: dict[str, tuple] = {
    "qwen3": ("qwen3",),
    "qwen3_moe": ("qwen3_moe",),
    "intern_s1": ("interns1", "internvl"),
}

# Model types the `auto` family trains: each is proven by tests/unit/test_models_auto.py to give the
# same loss and gradients packed as unpacked (its attention honours per-document position ids, sliding
# windows included) and to expose its blocks and output projection. Others are refused before launch.
# gemma3 is the multimodal Gemma 3: its language model (gemma3_text) is trained, the rest kept as is.
AUTO_MODEL_TYPES = ("llama", "mistral", "gemma3_text", "gemma3", "phi3", "qwen2", "qwen3")

# Why a known model type is refused (more specific than "not proven").
_REFUSED_WHY = {
    "gemma2": "its attention has no sdpa path in transformers and its logits are soft-capped",
}


def folder_config(load_from: str | None) -> dict[str, Any] | None:
    """load_from's config.json as a dict, or None when there is none (reported elsewhere)."""
    if load_from is None:
        return None
    path = Path(load_from).expanduser() / "config.json"
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def model_type_of(m: ModelSpec) -> str | None:
    """`model.arch.model_type`, else load_from's config.json `model_type`."""
    arch = dict(m.arch or {})
    if arch.get("model_type"):
        return str(arch["model_type"])
    cfg = folder_config(m.load_from) or {}
    return cfg.get("model_type")


def detect_family(m: ModelSpec) -> str | None:
    """The family `model.family: null` stands for: the tuned family of the model type, else auto."""
    if m.family is not None:
        return m.family
    model_type = model_type_of(m)
    if model_type is None:
        return None
    for family, types in TUNED_MODEL_TYPES.items():
        if model_type in types:
            return family
    return "auto"


def resolve_family(m: ModelSpec) -> ModelSpec:
    family = detect_family(m)
    return m if family == m.family else dataclasses.replace(m, family=family)


def family_problems(m: ModelSpec, *, check_files: bool = True) -> list[str]:
    """A family that cannot be decided, one that does not match load_from's model type, and a model
    the `auto` family cannot train safely."""
    if m.family is None:
        if check_files or m.load_from is None:
            return ["model.family is null and no model_type was found (model.load_from's config.json or "
                    f"model.arch.model_type): set model.family to one of {', '.join(CHOICES['model.family'])}"]
        return []
    if not check_files and m.load_from is not None:
        return []  # config.json is not read without file checks
    model_type = model_type_of(m)
    problems: list[str] = []
    if m.family in TUNED_MODEL_TYPES:
        cfg = folder_config(m.load_from) or {}
        found = cfg.get("model_type")
        if found and found not in TUNED_MODEL_TYPES[m.family]:
            problems.append(f"model.family={m.family} but {m.load_from}/config.json has model_type {found}: "
                            f"use model.family=auto (e.g. model=auto), or a {m.family} checkpoint")
        return problems
    if m.family != "auto":
        return problems  # an unknown family is reported by the CHOICES check
    if model_type is None:
        return ["model.family=auto needs a model_type: model.load_from's config.json has none and "
                "model.arch.model_type is not set"]
    if model_type not in AUTO_MODEL_TYPES:
        why = _REFUSED_WHY.get(model_type, "it is not proven to keep packed documents apart (attention that "
                                           "ignores per-document position ids) and to expose its decoder blocks")
        problems.append(f"model.family=auto: model_type {model_type} cannot be trained packed safely: {why}. "
                        f"Supported model types: {', '.join(AUTO_MODEL_TYPES)}")
    merged = {**(folder_config(m.load_from) or {}), **dict(m.arch or {})}
    capping = merged.get("final_logit_softcapping", (merged.get("text_config") or {}).get("final_logit_softcapping"))
    if capping is not None:
        problems.append(f"model.family=auto: final_logit_softcapping={capping} is not "
                        "supported (the chunked loss computes plain logits); set model.arch.final_logit_softcapping=null")
    return problems
