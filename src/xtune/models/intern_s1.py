"""Intern-S1 / Intern-S1-mini: InternViT + MLP projector + Qwen3 text, built as transformers' InternVL.

Original folders (e.g. internlm/Intern-S1-mini) have `model_type: "interns1"` (remote code) with a
vision config of `model_type: "interns1_vision"`. Their field names are InternVL's (vision_config,
text_config, image_token_id, downsample_ratio, projector_hidden_act, vision_feature_layer, ...), and
their weight keys are exactly transformers' InternVL keys:
    model.vision_tower.*  model.multi_modal_projector.*  model.language_model.*  lm_head.weight
(checked against xtuner's Intern-S1 loader, which maps its modules to these HF names). So the weight
map is the identity and only the config's model types differ.

Export layout: an export keeps the layout it came from. From an original folder it writes the original
config.json (+ arch overrides) and copies the folder's remote code, so it loads exactly like the
original (`trust_remote_code=True`). A randomly initialised model (no load_from) is written in
transformers' native `internvl` layout, which `AutoModelForImageTextToText` loads without remote code.
The reader accepts both. transformers' own `save_pretrained` of an InternVL model (and the InternVL
`-hf` checkpoints) writes the older key names `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*`, `multi_modal_projector.*`: they are read too, and an export from such a folder is
written with its key names again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from xtune.data.multimodal import IMG_CONTEXT
from xtune.errors import XtuneError
from xtune.models.base import ModelAdapter
from xtune.models.weights import rename_prefix

IMAGE_TOKEN = IMG_CONTEXT
# Keys of Intern-S1's remote config that transformers' InternVL config does not have (or spells differently).
_S1_ONLY = ("architectures", "auto_map", "transformers_version", "model_type")
# Older InternVL key prefixes (what transformers' save_pretrained writes) -> the model's, in match order.
_LEGACY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
)
_REVERSED = tuple((new, old) for old, new in _LEGACY_PREFIXES)


class InternS1Adapter(ModelAdapter):
    family = "intern_s1"
    auto_class = "AutoModelForImageTextToText"
    model_cls = InternVLForConditionalGeneration
    config_cls = InternVLConfig

    def to_model_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in sd.items():
            key = rename_prefix(key, _LEGACY_PREFIXES) or key
            out[key] = tensor
        return out

    def to_original_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._source_has_legacy_keys():
            return sd
        out = {}
        for key, tensor in sd.items():
            key = rename_prefix(key, _REVERSED) or key
            out[key] = tensor
        return out

    def _source_has_legacy_keys(self) -> bool:
        """Whether load_from's weights use the older InternVL key names (then an export does too)."""
        if self.spec.load_from is None:
            return False
        folder = Path(str(self.spec.load_from)).expanduser()
        keys = []
        for fname, names in self._weight_files(folder).items():
            if not names:
                with safe_open(str(folder / fname), framework="pt") as f:
                    names = list(f.keys())
            keys.extend(names)
        return any(k.startswith(old) for k in keys for old, _ in _LEGACY_PREFIXES)

    def config_from_dict(self, d: dict[str, Any]):
        d = {k: v for k, v in d.items() if k not in _S1_ONLY}
        vision = dict(d.pop("vision_config", {}) or {})
        for key in _S1_ONLY:
            vision.pop(key, None)
        text = dict(d.pop("text_config", {}) or {})
        text.setdefault("model_type", "qwen3")
        text.pop("architectures", None)
        if "image_token_id" not in d and self.spec.load_from is None:
            d["image_token_id"] = self._image_token_id_from_tokenizer()
        # InternVLConfig ties embeddings by default; Intern-S1's text model does not.
        d.setdefault("tie_word_embeddings", bool(text.get("tie_word_embeddings", False)))
        return InternVLConfig(vision_config=vision, text_config=text, **d)

    def _image_token_id_from_tokenizer(self) -> int:
        tok = self.load_tokenizer()
        tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid is None or tid == tok.unk_token_id:
            raise XtuneError(f"tokenizer {self.tokenizer_path()} has no {IMAGE_TOKEN} token; set model.arch.image_token_id")
        return int(tid)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.vision_tower.encoder.layer)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # Vision layers first: they run first in every forward (FSDP2 prefetch follows this order).
        return self.vision_layers(model) + list(self.language_model(model).layers)

    def apply_freeze(self, model: nn.Module) -> None:
        super().apply_freeze(model)
        groups = ((self.spec.freeze_vision, model.model.vision_tower),
                  (self.spec.freeze_projector, model.model.multi_modal_projector))
        for frozen, module in groups:
            if frozen:
                for p in module.parameters():
                    p.requires_grad_(False)

    def _extra_forward(self, model, batch):
        if batch.pixel_values is not None:
            return {"pixel_values": batch.pixel_values}, []
        # No image on this rank: still run the vision tower (on one blank tile) before the language
        # model, exactly where the image path runs it, and add 0 * its output. Under FSDP2 every rank
        # must all-gather the vision blocks in the same order, and the vision parameters must get a
        # (zero) gradient, or ranks with and without images would hang in their collectives.
        vision_cfg = model.config.vision_config
        size = vision_cfg.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)

        def add_blank_tile(_module, args, kwargs):
            embeds = kwargs["inputs_embeds"]
            tile = torch.zeros(1, vision_cfg.num_channels, h, w, device=embeds.device, dtype=embeds.dtype)
            feats = model.model.get_image_features(
                pixel_values=tile,
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output
            kwargs["inputs_embeds"] = embeds + 0.0 * feats.sum().to(embeds.dtype)
            return args, kwargs

        hook = self.language_model(model).register_forward_pre_hook(add_blank_tile, with_kwargs=True)
        return {}, [hook]
