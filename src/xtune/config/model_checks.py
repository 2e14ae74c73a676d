"""Checks of `model.load_from` against the rest of the model section, from its files alone (no transformers):
an `arch` key that changes the shape of the folder's weights, and a folder whose weights are not safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xtune.config.families import folder_config
from xtune.config.schema import ModelSpec

# config.json keys that decide the shape (or presence) of weight tensors: `model.arch` may override other keys
# of load_from's config (rope scaling, dropout, ...) but not these, which the folder's weights were saved with.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
              "num_local_experts", "tie_word_embeddings", "patch_size", "image_size")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def arch_problems(m: ModelSpec) -> list[str]:
    """`model.arch` keys that contradict `load_from`'s config.json where the weights' shapes depend on them."""
    original = folder_config(m.load_from)
    if not original or not m.arch:
        return []
    return _contradictions(dict(m.arch), original, "model.arch", f"{m.load_from}/config.json")


def _contradictions(arch: dict[str, Any], original: dict[str, Any], key: str, where: str) -> list[str]:
    out = []
    for name, value in arch.items():
        theirs = original.get(name)
        if isinstance(value, dict) and isinstance(theirs, dict):
            out.extend(_contradictions(dict(value), theirs, f"{key}.{name}", where))
        elif name in SHAPE_KEYS and name in original and value != theirs:
            out.append(f"{key}.{name}={value} contradicts {where} ({name}: {theirs}), whose weights have that shape; "
                       f"drop {key} (e.g. model=auto, whose arch is empty) or load another folder")
    return out


def no_safetensors_message(m: ModelSpec, expected: str) -> str:
    """Why a load_from folder without safetensors weights is refused, and how to convert one with pickled weights."""
    folder = Path(m.load_from or ".").expanduser()
    pickled = [f for f in PICKLE_WEIGHTS if (folder / f).is_file()]
    if not pickled:
        return f"model.load_from={m.load_from}: no weights there (expected {expected})"
    return (f"model.load_from={m.load_from}: the weights are {pickled[0]} (a pickle), and xtune reads safetensors only "
            "(pickles can run code when loaded). Convert once: `AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder)` (transformers writes safetensors), then set model.load_from=new_folder")
