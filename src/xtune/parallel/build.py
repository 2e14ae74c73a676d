"""The one model build path: the Hugging Face model on the meta device, in its master dtype, frozen as the spec
says, adapters injected. Training shards and materialises it (`parallel.fsdp.build_sharded`); export materialises it
plain on CPU (`checkpoint.hf_export`)."""

from __future__ import annotations

import torch

from xtune import peft as xpeft
from xtune.config.schema import RunSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def meta_model(adapter, spec: RunSpec, attn_impl: str | None, *, adapters: bool = True):
    """(model on meta, its config, LoraConfig or None). `adapters=False` builds the bare base (a full export)."""
    config = adapter.build_config()
    with torch.device("meta"):
        model = adapter.build_model(config, attn_impl)
    model.to(dtype=DTYPES[spec.model.dtype])
    adapter.apply_freeze(model)
    lora_config = xpeft.inject(model, adapter, spec.peft) if adapters and xpeft.enabled(spec.peft) else None
    return model, config, lora_config
