"""LoRA / DoRA adapters with the `peft` package, injected into the meta-device model before FSDP2 wraps it.

peft replaces each targeted `nn.Linear` by a `peft.tuners.lora.Linear` whose frozen base is `base_layer` and
whose adapters are `lora_A` / `lora_B` (and DoRA's `lora_magnitude_vector`); modules in `modules_to_save` get a
trained copy beside the frozen original. The model keeps its class, so the family adapters, FSDP2's per-block
wrapping, packing and the chunked loss see the same model as in full tuning.

Adapter weights are initialised here, not by peft: peft initialises them on the meta device (nothing), and a
per-shard random init would make the start depend on the number of ranks. Every rank builds the same full
tensors from the seed and loads them through `set_model_state_dict`, so 1x4 and 2x2 layouts start identically.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from xtune.config.schema import RunSpec
from xtune.errors import ConfigError

log = logging.getLogger("xtune.peft")

ADAPTER = "default"  # peft's adapter name; one adapter per run
ALL_LINEAR = "all-linear"
# Parts of a peft key that are not in the base model's key (`q_proj.base_layer.weight` <- `q_proj.weight`).
_WRAPPER_PARTS = (".base_layer.", ".original_module.", f".modules_to_save.{ADAPTER}.")
_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_embedding_A.", ".lora_embedding_B.",
                  f".modules_to_save.{ADAPTER}.")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def enabled(peft_spec) -> bool:
    return peft_spec is not None and peft_spec.method != "none"


# ----------------------------------------------------------------------------------------- targets


def linear_layers(model: nn.Module, adapter) -> tuple[list[str], list[str]]:
    """(every nn.Linear of the model except the output layer, those inside the language model's blocks).
    Blocks come from the family adapter (by module identity), so any decoder layout works."""
    output = model.get_output_embeddings()
    in_language = {id(m) for m in adapter.language_model(model).modules()}
    in_blocks = {id(m) for block in adapter.blocks(model) if id(block) in in_language for m in block.modules()}
    everything, language = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            everything.append(name)
            if id(module) in in_blocks:
                language.append(name)
    return everything, language


def resolve_targets(model: nn.Module, adapter, peft_spec) -> tuple[list[str], list[str]]:
    """(full names of the linear layers that get adapters, problems).

    `all-linear` is every linear layer of the language model's blocks; a plain name (q_proj) matches that
    suffix in the language model; anything else is a regex matched against the full names of every linear
    layer (e.g. `.*vision_tower.*attention.*proj`), so vision layers are adapted only when asked by name.
    """
    everything, language = linear_layers(model, adapter)
    chosen: dict[str, None] = {}
    problems = []
    for pattern in peft_spec.target_modules:
        if pattern == ALL_LINEAR:
            hits = language
        elif _IDENTIFIER.match(pattern):
            hits = [n for n in language if n == pattern or n.endswith("." + pattern)]
        else:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                problems.append(f"peft.target_modules: {pattern!r} is not a valid regex ({e})")
                continue
            hits = [n for n in everything if rx.fullmatch(n)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in language})
            problems.append(f"peft.target_modules: {pattern!r} matches no linear layer of model {adapter.spec.name}; "
                            f"its language-model linear layers are {', '.join(suffixes)} (or use all-linear, "
                            "or a regex over full module names)")
        chosen.update(dict.fromkeys(hits))
    return list(chosen), problems


def check_targets(adapter, spec: RunSpec) -> list[str]:
    """Problems with peft.target_modules, resolved on a meta-device model (no weights are allocated)."""
    if not enabled(spec.peft):
        return []
    with torch.device("meta"):
        model = adapter.build_model(adapter.build_config(), "sdpa")
    problems = resolve_targets(model, adapter, spec.peft)[1]
    names = [n for n, _ in model.named_modules()]
    for want in spec.peft.modules_to_save:
        if not any(n == want or n.endswith("." + want) for n in names):
            problems.append(f"peft.modules_to_save: no module named {want!r} in model {spec.model.name} "
                            "(e.g. embed_tokens, lm_head)")
    return problems


def lora_config(peft_spec, targets: Iterable[str]):
    # lazy: peft is a heavy import (seconds) that only adapter runs need
    from peft import LoraConfig

    return LoraConfig(
        r=peft_spec.r, lora_alpha=peft_spec.alpha, lora_dropout=peft_spec.dropout, bias="none",
        target_modules=list(targets), modules_to_save=list(peft_spec.modules_to_save) or None,
        use_dora=peft_spec.method == "dora",
    )


def inject(model: nn.Module, adapter, peft_spec):
    """Put adapters into the (meta) model in place; only adapter and modules_to_save weights stay trainable.
    Returns the LoraConfig, which the export writes as adapter_config.json."""
    # lazy: peft is a heavy import (seconds) that only adapter runs need
    from peft import inject_adapter_in_model

    targets, problems = resolve_targets(model, adapter, peft_spec)
    if problems:
        raise ConfigError(problems)
    config = lora_config(peft_spec, targets)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    m = adapter.spec
    if adapter.vision_layers(model) and not (m.freeze_vision and m.freeze_projector):
        # peft freezes everything but the adapters; a full vision tower beside them would have to travel in
        # hf_adapter as a second copy (modules_to_save). Say so rather than train less than the flags suggest.
        log.warning("with adapters the vision tower and projector stay frozen (model.freeze_vision/"
                    "freeze_projector=false are ignored); adapt their linear layers with a regex in "
                    "peft.target_modules, e.g. '.*vision_tower.*attention.*proj'")
    return config


# ----------------------------------------------------------------------------------------- weights


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in _ADAPTER_PARTS)


def base_key(key: str) -> str:
    """The base model's name of a peft-wrapped key (identity for keys peft did not touch)."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, ".")
    return key



def to_peft_keys(model_keys: Iterable[str], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A base-model state dict -> the wrapped model's keys: frozen bases and the trained copies of
    modules_to_save start from the same tensors; LoRA weights are not in it (init_adapter_weights)."""
    out = {}
    for key in model_keys:
        if any(p in key for p in _ADAPTER_PARTS[:-1]):
            continue
        source = base_key(key)
        if source in sd:
            out[key] = sd[source]
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: DTensor shards are gathered (a collective), NF4 is dequantised."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if hasattr(t, "get_original_weight"):  # torchao NF4Tensor
        t = t.get_original_weight()
    return t.detach()


@torch.no_grad()
def init_adapter_weights(model: nn.Module, seed: int) -> None:
    """LoRA A ~ kaiming-uniform (as nn.Linear and peft), B = 0, so training starts at the base model;
    DoRA magnitude = row norms of the base weight; modules_to_save copies = their originals.
    Collective under FSDP2 (gathers the bases DoRA and modules_to_save need), same order on every rank."""
    # lazy: peft is a heavy import (seconds) that only adapter runs need
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    full: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for module in model.modules():
        name = state_name(names[id(module)])
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            a = module.lora_A[ADAPTER].weight
            # Seeded by the layer's name: the same values whatever wraps the blocks (checkpointing, FSDP).
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            init_a = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init_a, a=math.sqrt(5), generator=gen)
            full[f"{name}.lora_A.{ADAPTER}.weight"] = init_a.to(a.dtype)
            b = module.lora_B[ADAPTER].weight
            full[f"{name}.lora_B.{ADAPTER}.weight"] = torch.zeros(b.shape, dtype=b.dtype)
            if ADAPTER in getattr(module, "lora_magnitude_vector", {}):
                mag = module.lora_magnitude_vector[ADAPTER].weight
                base = full_tensor(module.get_base_layer().weight).float()
                full[f"{name}.lora_magnitude_vector.{ADAPTER}.weight"] = base.norm(p=2, dim=1).to(mag.dtype)
        elif isinstance(module, ModulesToSaveWrapper) and ADAPTER in module.modules_to_save:
            for pname, p in module.original_module.named_parameters():
                full[f"{name}.modules_to_save.{ADAPTER}.{pname}"] = full_tensor(p).to(p.dtype)
    if full:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def state_name(module_name: str) -> str:
    """A module's prefix in state-dict keys: activation checkpointing's wrapper is not part of the names."""
    return module_name.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the unsharded model (DTensor and NF4 report their full numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def adapted_bases(model: nn.Module) -> list[nn.Module]:
    """The frozen base linear layers under the adapters (what QLoRA keeps in 4 bits)."""
    # lazy: peft is a heavy import (seconds) that only adapter runs need
    from peft.tuners.lora import LoraLayer

    return [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]


def describe(trainable: int, total: int) -> str:
    pct = 100.0 * trainable / max(total, 1)
    return f"trainable parameters: {trainable:,} of {total:,} ({pct:.2f}%)"
