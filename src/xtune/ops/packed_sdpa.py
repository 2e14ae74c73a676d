"""SDPA over a packed row one document at a time: attention costs sum(L_i^2), not T^2.

transformers' own sdpa path isolates the documents of a packed [1, T] row with a block-diagonal [T, T] mask,
so the kernel still computes every query against every key of the row: on CPU (and on a GPU without
flash-attn) that was half of a LoRA step's time on the bench's `blocks` shape (2048-token rows of ~27 documents).
Here the row is cut at `cu_seq_lens_q` (passed by `attention.packed_kwargs`) and each document gets its own
causal SDPA call, as flash-attn's varlen kernel does; the sequence-parallel wrapper (engine/ulysses.py) does the same.

Plugged in through transformers' public `AttentionInterface` registry (checked on transformers 5.24) as
`xtune_packed_sdpa` on the text decoder of the training model only. The name is not a mask function, so
transformers builds no [T, T] mask for it. Sliding-window layers get a banded causal mask for documents longer
than the window; models with bidirectional attention keep transformers' sdpa.
"""

from __future__ import annotations

import torch

NAME = "xtune_packed_sdpa"


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """Bool [1, 1, n, n]: True where query i may attend key j (j <= i and i - j < window), as masking_utils."""
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]
    return ((diff >= 0) & (diff < window))[None, None]


def packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                max_length_q=None, max_length_k=None, sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        raise RuntimeError(f"{NAME} needs the packed row's cu_seq_lens_q (xtune.ops.attention.packed_kwargs)")
    kwargs.pop("is_causal", None)  # decided per document below
    outs = []
    cu = cu_seq_lens_q.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        mask = None  # causal, the kernel's own is_causal path
        if sliding_window is not None and e - s > sliding_window:
            mask = _window_mask(e - s, sliding_window, query.device)
        o, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask,
                                      is_causal=mask is None, **kwargs)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def applies(language_model, attn_impl: str) -> bool:
    """sdpa on a causal decoder (not Gemma-style bidirectional attention)."""
    return attn_impl == "sdpa" and not getattr(language_model.config, "use_bidirectional_attention", False)


def use_on(language_model, attn_impl: str) -> bool:
    """Switch the text decoder's attention to the per-document SDPA where it applies; returns whether it did.
    Only for a model that is fed packed rows with `packed_kwargs` (the engine's training model)."""
    if not applies(language_model, attn_impl):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)
    language_model.config._attn_implementation = NAME
    return True
