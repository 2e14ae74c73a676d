"""`auto`: any supported Hugging Face causal LM through transformers' Auto classes.

Nothing here names a model's modules or parameters: the config comes from `AutoConfig` (the folder's
`model_type`), the model from `AutoModelForCausalLM`, the decoder from `get_decoder()`, its blocks from
transformers' `_no_split_modules` (else the decoder's layer list), the final hidden states from the
decoder's output and the output projection from `get_output_embeddings()`. Blocks are found by module
class, so they are found the same after peft wraps the linear layers inside them. Weights keep their
own key names both ways. Which model types may use this family is decided at compose time
(`config/families.py`: only those proven to pack safely).

A multimodal checkpoint listed in `TEXT_PART_PREFIXES` (Gemma 3 4B-27B) is trained text-only: its
language model is built as the text model transformers has for it, and the export is the whole
multimodal folder again, vision tower and projector copied unchanged from `load_from`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

from xtune.errors import ConfigError
from xtune.models.base import ModelAdapter
from xtune.models.safetensors_io import SafetensorsView
from xtune.models.weights import rename_prefix
from xtune.ops.attention import packed_kwargs

# Composite model_type -> (checkpoint prefix, text-model prefix) of its language model. transformers 5.24
# writes Gemma 3 in the hub's layout (`language_model.model.*`); its in-memory layout is read too.
TEXT_PART_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3": (("language_model.model.", "model."), ("model.language_model.", "model."),
               ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")),
}


class AutoAdapter(ModelAdapter):
    family = "auto"
    auto_class = "AutoModelForCausalLM"

    def config_from_dict(self, d: dict[str, Any]):
        d = {k: v for k, v in d.items() if k not in ("architectures", "auto_map", "transformers_version")}
        model_type = d.pop("model_type", None)
        if not model_type:
            raise ConfigError(["model.family=auto needs a model_type (load_from's config.json or model.arch.model_type)"])
        config = AutoConfig.for_model(model_type, **d)
        return config.get_text_config() if model_type in TEXT_PART_PREFIXES else config

    # ----------------------------------------------------------------- the text part of a multimodal folder
    @cached_property
    def _text_part_prefixes(self) -> tuple[tuple[str, str], ...] | None:
        """The key prefixes when load_from is a multimodal checkpoint trained text-only, else None (read once:
        the weight stream converts one key at a time)."""
        original = self.original_config_dict() if self.spec.load_from is not None else None
        return TEXT_PART_PREFIXES.get((original or {}).get("model_type"))

    def to_model_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefixes = self._text_part_prefixes
        if prefixes is None:
            return sd
        # Keys outside the language model (vision tower, projector) are dropped: the export copies them back.
        renamed = {key: rename_prefix(key, prefixes) for key in sd}
        return {new: sd[key] for key, new in renamed.items() if new is not None}

    def adapter_module_prefix(self) -> tuple[str, str] | None:
        # hf_adapter/ loads onto the multimodal model: transformers 5.24 names its language model's
        # modules `model.language_model.*` in memory (the text model's are `model.*`).
        return ("model.", "model.language_model.") if self._text_part_prefixes else None

    def to_original_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefixes = self._text_part_prefixes
        if prefixes is None:
            return sd
        back = {}
        for old, new in prefixes:
            back.setdefault(new, old)  # the first prefix is the layout transformers writes
        out = {rename_prefix(key, back.items()): tensor for key, tensor in sd.items()}
        # The parts not trained, read back unchanged (a copy: the source files may be replaced later).
        folder = Path(str(self.spec.load_from)).expanduser()
        for fname, keys in self._weight_files(folder).items():
            view = SafetensorsView(folder / fname)
            for key in keys or view.keys():
                if rename_prefix(key, prefixes) is None:
                    out[key] = view.get(key).clone()
        return out

    def model_class(self, config) -> Any:
        try:
            return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise ConfigError([f"model.family=auto: transformers has no causal LM for model_type "
                               f"{config.model_type}"]) from None

    @torch.no_grad()
    def reset_buffers(self, model: nn.Module) -> None:
        # Non-persistent buffers differ per model (Gemma 3 keeps one rotary table per layer type and an
        # embedding scale); transformers' own init knows them all. It also re-inits the parameters,
        # which the weights loaded next overwrite (a missing weight is an error there).
        self.init_weights(model)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder blocks in forward order: the outermost modules of a class transformers lists in
        `_no_split_modules` (what accelerate's device maps never split), else the decoder's longest
        layer list. (`_no_split_modules` is a class attribute with no public accessor, checked on transformers
        5.24; this is xtune's only read of it.)"""
        decoder = self.language_model(model)
        names = set(getattr(model, "_no_split_modules", None) or ())
        found: list[nn.Module] = []

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if type(child).__name__ in names:
                    found.append(child)
                else:
                    walk(child)

        walk(decoder)
        if not found:
            lists = [c for c in decoder.children() if isinstance(c, nn.ModuleList) and len(c)]
            found = list(max(lists, key=len)) if lists else []
        if not found:
            raise ConfigError([f"model.family=auto: no decoder blocks found in {type(model).__name__} (neither "
                               f"_no_split_modules nor a layer list in its decoder); it cannot be sharded per block"])
        return found

    def _forward_kwargs(self, model, batch, attn_impl) -> dict[str, Any]:
        if attn_impl == "eager":
            # One explicit 4D block mask would be used for every layer and drop sliding windows (Mistral,
            # Gemma 3, Phi-3). transformers' masking_utils (checked on 5.24) builds each layer's mask itself
            # from per-document position ids for eager as for sdpa, windows included.
            return packed_kwargs(batch, "sdpa")
        return super()._forward_kwargs(model, batch, attn_impl)

    def validate(self) -> list[str]:
        """The config checks, then the model built on the meta device (no memory) must expose its blocks
        and an output projection without bias (the chunked loss computes hidden @ weight.T)."""
        problems = super().validate()
        if problems:
            return problems
        try:
            config = self.build_config()
            with torch.device("meta"):
                model = self.build_model(config, "sdpa")
            self.blocks(model)
        except ConfigError as e:
            return e.problems
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            problems.append(f"model.family=auto: {type(model).__name__} has no output projection without bias")
        return problems
