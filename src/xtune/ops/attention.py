"""Attention backend choice and the forward kwargs that keep packed documents apart.

A micro-batch is one [1, T] row holding several documents (see `PackedBatch`). Each backend needs
a different signal to stop attention crossing document boundaries:

  flash_attention_2  varlen kernel: `cu_seq_lens_q/k` (int32) and `max_length_q/k` (int), read by
                     transformers' `_flash_attention_forward`; position_ids restart per document.
  sdpa               per-document `position_ids`, no attention_mask, no cache: transformers'
                     masking_utils (`find_packed_sequence_indices`) then builds a block-diagonal
                     causal mask. With a cache or a 2D mask it does not, so both are excluded here.
  xtune_packed_sdpa  sdpa one document at a time (ops/packed_sdpa.py): `cu_seq_lens_q` as for flash;
                     the engine's training model on sdpa uses it (no [T, T] mask, sum(L_i^2) work).
  eager              an explicit float 4D mask (0 allowed / finfo.min blocked); a bool mask is
                     wrong for eager (it is added to the scores).
"""

from __future__ import annotations

from typing import Any

import torch

from xtune.errors import XtuneError
from xtune.ops.packed_sdpa import NAME as PACKED_SDPA


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Float [1, 1, T, T] mask: 0 where query i may attend key j (same document, j <= i), else finfo.min."""
    device = device if device is not None else cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if doc.numel() != total:
        raise ValueError(f"cu_seqlens covers {doc.numel()} tokens but the batch has {total}")
    pos = torch.arange(total, device=device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    mask = torch.full((total, total), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask.masked_fill_(allowed, 0.0)
    return mask[None, None]


def packed_kwargs(batch, impl: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Kwargs for a transformers forward over `batch` ([1, T]) that isolate its documents.

    `dtype` is the compute dtype (only the eager mask uses it).
    """
    kwargs: dict[str, Any] = {"position_ids": batch.position_ids, "use_cache": False}
    if impl in ("flash_attention_2", PACKED_SDPA) or impl.startswith("xtune_sp_"):
        # (sequence parallel: the full row's, read by engine/ulysses.py's wrapper around each attention call;
        # xtune_packed_sdpa: ops/packed_sdpa.py, one SDPA call per document)
        cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch.max_seqlen),
                      max_length_k=int(batch.max_seqlen))
    elif impl == "eager":
        kwargs["attention_mask"] = block_causal_mask(batch.cu_seqlens, batch.num_tokens, dtype,
                                                     device=batch.input_ids.device)
    elif impl != "sdpa":
        raise XtuneError(f"unsupported attention implementation {impl!r}")
    return kwargs
