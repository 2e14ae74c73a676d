"""Qwen3 dense (Qwen3ForCausalLM). The original HF layout is transformers' layout: no key map."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from xtune.models.base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    family = "qwen3"
    auto_class = "AutoModelForCausalLM"
    model_cls = Qwen3ForCausalLM
    config_cls = Qwen3Config
