"""QLoRA's 4-bit base: torchao's NF4 tensor (NormalFloat-4 with double-quantised block scales).

Why torchao and not bitsandbytes: NF4Tensor is a plain PyTorch tensor subclass, so it runs on CPU and GPU
without compiled kernels, dequantises inside `F.linear` (its backward never needs a weight gradient), and it
implements FSDP2's all-gather extension points, which bitsandbytes' Params4bit does not.

Layout: the quantized bases are left out of FSDP2's sharding (`fully_shard(ignored_params=...)`) and kept
whole on every rank, as in data-parallel QLoRA: 0.5 byte per base parameter per rank plus the scales, no
all-gather of the base in forward or backward, and quantization of identical full tensors on every rank, so
every layout computes with the same 4-bit weights. The adapters, embeddings, norms and head are sharded as usual.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from xtune.peft.lora import adapted_bases, state_name

log = logging.getLogger("xtune.peft")

BLOCK_SIZE = 64  # values per absmax block (QLoRA's choice)
SCALER_BLOCK_SIZE = 256  # block scales per second-level (double) quantization block


def _nf4():
    # lazy: torchao is the optional QLoRA extra (checked with 0.18)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4

    return NF4Tensor, to_nf4


def is_nf4(t) -> bool:
    return hasattr(t, "get_original_weight") and hasattr(t, "quantized_data")


def scaler_block_size(numel: int) -> int:
    """The largest power of two <= 256 that divides the number of blocks (torchao needs exact division);
    0 when the tensor cannot be split into 64-value blocks."""
    if numel % BLOCK_SIZE:
        return 0
    blocks = numel // BLOCK_SIZE
    size = SCALER_BLOCK_SIZE
    while size > 1 and blocks % size:
        size //= 2
    return size


def _quantizable(model: nn.Module) -> list[nn.Module]:
    return [base for base in adapted_bases(model) if scaler_block_size(base.weight.numel())]


def ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The base weights that will be quantized: FSDP2 must leave them whole (replicated) on every rank."""
    return {base.weight for base in _quantizable(model)}


def take_off_bases(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """Unregister the to-be-quantized base weights (still on `meta`): {state key: (base linear, meta weight)}.
    `to_empty` then leaves them unallocated and the load's `set_model_state_dict` never sees them (a meta
    parameter makes it assign the file's tensors instead of copying them); the load quantizes each one as it
    arrives and registers it again in 4 bits (`quantize_into`), so the base is never whole in the compute dtype."""
    bases = {id(base) for base in _quantizable(model)}
    taken = {f"{state_name(name)}.weight": (m, m.weight) for name, m in model.named_modules() if id(m) in bases}
    for base, _ in taken.values():
        base.register_parameter("weight", None)
    return taken


@torch.no_grad()
def quantize_into(base: nn.Module, weight: torch.Tensor) -> None:
    """`base.weight` <- the NF4 form of `weight` (a full-precision tensor, whole)."""
    _, to_nf4 = _nf4()
    sbs = scaler_block_size(weight.numel())
    base.weight = nn.Parameter(to_nf4(weight.detach(), BLOCK_SIZE, sbs), requires_grad=False)


@torch.no_grad()
def quantize_bases(model: nn.Module) -> tuple[int, int]:
    """Replace each adapted base weight by its NF4 form, in place (those already NF4 are left as they are).
    Returns (quantized, left in full precision)."""
    done = kept = 0
    for base in adapted_bases(model):
        w = base.weight
        if is_nf4(w):
            continue
        if not scaler_block_size(w.numel()):
            kept += 1
            continue
        quantize_into(base, w)
        done += 1
    if kept:
        log.warning("%d adapted layers have a weight size not divisible by %d and stay in full precision", kept, BLOCK_SIZE)
    return done, kept


def nf4_bytes(t) -> int:
    """Bytes an NF4 tensor holds in memory (codes, scales, double-quantization factors)."""
    parts = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
    return sum(p.numel() * p.element_size() for p in parts)


def dequantize_state(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """NF4 entries -> plain tensors of `dtype` (export and merge); other entries unchanged."""
    return {k: (v.get_original_weight().to(dtype) if is_nf4(v) else v) for k, v in sd.items()}


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if is_nf4(p)]
