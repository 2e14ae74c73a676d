"""Parameter-efficient tuning: LoRA / DoRA adapters (the `peft` package) on a frozen, optionally NF4 base.

targets = resolve_targets(model, adapter, spec.peft)     # module names, checked before any weights exist
inject(model, adapter, spec.peft)                        # on the meta model, before fully_shard
... shard (quantized bases are FSDP-ignored), materialise, load the base ...
# QLoRA: the bases are taken off before materialising (quant.take_off_bases) and quantized as they load
# (quant.quantize_into); a random-init base is quantized after (quant.quantize_bases)
init_adapter_weights(model, seed)                        # identical on every rank and layout
engine.export.write_peft(...)                            # PEFT folder + merged HF weights
"""

from xtune.peft.lora import (
    check_targets,
    describe,
    enabled,
    init_adapter_weights,
    inject,
    is_adapter_key,
    lora_config,
    parameter_counts,
    resolve_targets,
    to_peft_keys,
)
from xtune.peft.saved_base import base_state, saved_base_dir, with_saved_base

__all__ = [
    "base_state", "check_targets", "describe", "enabled", "init_adapter_weights", "inject",
    "is_adapter_key", "lora_config", "parameter_counts", "resolve_targets", "saved_base_dir", "to_peft_keys",
    "with_saved_base",
]
