"""Building a model: its transformers config, the module on the meta device, initialisation and freezing.

`ModelBuilder` is one part of `ModelAdapter` (models/base.py); a family overrides what differs (its config
class, where its decoder and blocks are, what it freezes).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from xtune.errors import XtuneError


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested dicts (text_config, vision_config) are merged, not replaced."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def plain(value):
    """OmegaConf containers (ListConfig/DictConfig) and tuples -> plain Python for config classes."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        return [plain(v) for v in value]
    return value


class ModelBuilder:
    family: str = ""
    auto_class: str = "AutoModelForCausalLM"
    model_cls: Any = None  # transformers model class
    config_cls: Any = None  # transformers config class
    spec: Any  # the model spec (config/schema.ModelSpec), set by ModelAdapter

    # ----------------------------------------------------------------- config
    def original_config_dict(self) -> dict[str, Any] | None:
        if self.spec.load_from is None:
            return None
        path = Path(str(self.spec.load_from)).expanduser() / "config.json"
        if not path.is_file():
            raise XtuneError(f"model.load_from: {path} not found")
        with open(path) as f:
            return json.load(f)

    def config_from_dict(self, d: dict[str, Any]):
        """Original config.json dict -> the transformers config xtune builds the model from."""
        d = {k: v for k, v in d.items() if k not in ("architectures", "auto_map", "transformers_version")}
        d.pop("model_type", None)
        return self.config_cls(**d)

    def build_config(self):
        arch = plain(dict(self.spec.arch or {}))
        original = self.original_config_dict()
        merged = deep_update(original, arch) if original is not None else arch
        # transformers 5 validates configs with huggingface_hub's strict dataclasses (huggingface_hub 1.x).
        try:
            config = self.config_from_dict(merged)
        except (ValueError, TypeError, StrictDataclassError) as e:  # values that contradict each other
            where = f"{self.spec.load_from}/config.json with model.arch" if original is not None else "model.arch"
            raise XtuneError(f"the model config ({where}) is invalid: {e}") from None
        config.use_cache = False
        return config

    # ----------------------------------------------------------------- model
    def model_class(self, config) -> Any:
        """The transformers class built for `config`."""
        return self.model_cls

    def build_model(self, config, attn_impl: str) -> nn.Module:
        """The model for `config` (call under `torch.device("meta")`), through the family's Auto class: its
        public `from_config` sets the attention implementation and the dtype as `from_pretrained` does."""
        cls = self.model_class(config)  # a family's own error for a config it cannot build comes first
        dtype = getattr(torch, self.spec.dtype)
        model = getattr(transformers, self.auto_class).from_config(config, attn_implementation=attn_impl, dtype=dtype)
        if type(model) is not cls:
            raise XtuneError(f"transformers built {type(model).__name__} for the {self.family} family, not {cls.__name__}")
        model.config.use_cache = False
        return model

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        """Initialise a materialised model with transformers' own init, from the current torch seed. A model
        built on the meta device has no module marked as initialised (transformers 5.24 skips the init there),
        so every module is initialised here."""
        model.initialize_weights()
        model.tie_weights()

    @torch.no_grad()
    def reset_buffers(self, model: nn.Module) -> None:
        """Recompute non-persistent buffers (rotary inv_freq) that `to_empty` leaves uninitialised and
        that checkpoints do not contain. Call after materialising a meta model that gets loaded weights.

        transformers has no public call for the buffers alone (checked on 5.24): this mirrors the rotary
        branch of `PreTrainedModel._init_weights`, which finds rotary modules by class name too."""
        for module in model.modules():
            if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
                if module.rope_type == "default":
                    inv_freq, _ = module.compute_default_rope_parameters(module.config)
                else:
                    inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (has .layers and .norm)."""
        return model.model

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        """The vision encoder's layers (none for a text model)."""
        return []

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(self.language_model(model).layers)

    def apply_freeze(self, model: nn.Module) -> None:
        if self.spec.freeze_language:
            for p in self.language_model(model).parameters():
                p.requires_grad_(False)
            for p in model.get_output_embeddings().parameters():
                p.requires_grad_(False)

    def output_weight(self, model: nn.Module) -> torch.Tensor:
        return model.get_output_embeddings().weight
