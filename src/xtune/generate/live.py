"""Generating with a model as it is: a training module (maybe FSDP2-sharded, maybe with xtune's packed attention)
turned into an inference module for the length of one call, and back.

- Attention: the training model may run xtune's packed kernels (`xtune_packed_sdpa`, `xtune_sp_*`), which assume
  packed rows without a cache. For the call every transformers model inside is switched to `sdpa` with
  transformers' public `set_attn_implementation`, and switched back after (transformers 5.25 has no public getter
  for the current one: `config._attn_implementation` is read to restore it).
- Mode: `eval()`, `torch.no_grad()`, and the KV cache on (passed to `generate`).
- FSDP2: the module given is the FSDP root (the trainer's `root`, which holds the HF model as `.model`). Its own
  parameters (embeddings, final norm, lm_head) are all-gathered with the public `FSDPModule.unshard()` for the
  call and resharded after; each decoder block is gathered by its own FSDP hooks for its forward and freed after it
  (`reshard_after_forward`), so the whole model is never gathered on one rank: peak memory is the root's
  parameters plus one block, at the price of one all-gather per block per decoding step. Every rank must then run
  the same number of forwards: `generate` gets `synced_gpus=True` (a finished rank keeps stepping until all are
  done) and ranks with fewer batches run a dummy batch (`shard.py`). Generating before the first training step is
  fine: the root's FSDP lazy init runs first, as its own first forward would (`_init_as_root`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from xtune.errors import XtuneError

STANDARD_ATTENTION = "sdpa"


def hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `module`: the module itself, or the `.model` of a training root."""
    if isinstance(module, PreTrainedModel):
        return module
    inner = getattr(module, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise XtuneError(f"Generator needs a transformers model (PreTrainedModel) or a module holding one as .model, "
                     f"got {type(module).__name__}")


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def check_root(root: torch.nn.Module) -> None:
    """A sharded model must be given as its FSDP root, whose own parameters (embeddings, lm_head) can be gathered."""
    if is_sharded(root) and not isinstance(root, FSDPModule):
        raise XtuneError(f"Generator got a {type(root).__name__} with FSDP-sharded parameters that is not an FSDP root: "
                         "pass the module fully_shard was applied to last (the trainer's `root`, not `root.model`)")


def _attn_of(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)  # no public getter in transformers 5.25


def _init_as_root(root: FSDPModule) -> None:
    """FSDP2 makes root the module whose forward runs first. Generating calls the HF model's forward, not the training
    root's: before the first training step that would make each block a root of its own, and the next training
    forward fails ("requires running forward through the root module first"). So the root's lazy init runs here,
    as its first forward would (no-op once done). torch 2.13 has no public call for it: `_get_fsdp_state()._lazy_init()`
    (docs/PRIVATE_APIS.md)."""
    root._get_fsdp_state()._lazy_init()


@contextmanager
def inference(root: torch.nn.Module, model: torch.nn.Module):
    """`root` (the FSDP root, or the model itself) ready to generate; everything put back after."""
    was_training = root.training
    switched = []
    for sub in model.modules():
        impl = _attn_of(sub) if isinstance(sub, PreTrainedModel) else None
        if impl is not None and impl.startswith("xtune_"):
            switched.append((sub, impl))
    unshard = isinstance(root, FSDPModule) and is_sharded(root)
    try:
        root.eval()
        for sub, _ in switched:
            sub.set_attn_implementation(STANDARD_ATTENTION)
        if unshard:
            _init_as_root(root)
            root.unshard()
        with torch.no_grad():
            yield
    finally:
        if unshard:
            root.reshard()
        for sub, impl in reversed(switched):
            sub.set_attn_implementation(impl)
        root.train(was_training)
