"""SDPA over a packed row one document at a time: attention costs sum(L_i^2), not T^2.

transformers' own sdpa path isolates the documents of a packed [1, T] row with a block-diagonal [T, T] mask,
so the kernel still computes every query against every key of the row: on CPU (and on a GPU without
flash-attn) that was half of a LoRA step's time on the bench's `blocks` shape (2048-token rows of ~27 documents).
Here the row is cut at `cu_seq_lens_q` (passed by `attention.packed_kwargs`) and each document gets its own
causal SDPA call, as flash-attn's varlen kernel does; the sequence-parallel wrapper (engine/ulysses.py) does the same.

On CUDA in bf16/fp16 the whole row goes to torch's own varlen FlashAttention kernel instead
(`torch.nn.attention.varlen.varlen_attn`, public since torch 2.10): one launch per layer, no flash-attn package
needed. The per-document loop stays the path elsewhere (CPU, fp32), and the reference the GPU tests compare to.

Plugged in through transformers' public `AttentionInterface` registry (checked on transformers 5.24) as
`xtune_packed_sdpa` on the text decoder of the training model. Its mask function builds only padding masks, so
no [T, T] mask is built for a packed row. Sliding-window layers get a banded causal mask for documents longer
than the window; models with bidirectional attention keep transformers' sdpa. Called without `cu_seq_lens_q`
(the model used directly, e.g. in tests) it is transformers' sdpa with the padding mask, if any.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

try:  # torch >= 2.10; CUDA only
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None

NAME = "xtune_packed_sdpa"
_VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters) if _varlen_attn is not None else set()


def varlen_applies(query: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether a packed row can take torch's varlen FlashAttention kernel: CUDA, half precision, one row,
    head dim <= 256, no attention dropout (the kernel has none)."""
    return ("window_size" in _VARLEN_PARAMS and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[0] == 1 and query.shape[-1] <= 256 and not dropout)


def varlen_forward(query, key, value, cu: torch.Tensor, max_len: int, scaling=None, sliding_window=None):
    """Causal attention of every document of a packed [1, H, T, D] row in one kernel call -> [1, T, H, D]."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    kwargs = {"scale": scaling}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    # causal: (left, 0); a sliding window of W keeps keys with i - j < W, as transformers' masks
    kwargs["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    cu = cu.to(device=q.device, dtype=torch.int32)
    return _varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), **kwargs)[None]


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    """Bool [1, 1, n, n]: True where query i may attend key j (j <= i and i - j < window), as masking_utils."""
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]
    return ((diff >= 0) & (diff < window))[None, None]


# Not traced by torch.compile (parallel.compile): the loop below is shaped by the row's document boundaries, so a
# traced version would recompile for every new packing.
@torch.compiler.disable
def packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                max_length_q=None, max_length_k=None, sliding_window=None, **kwargs):
    if cu_seq_lens_q is None:
        return _unpacked(module, query, key, value, attention_mask, sliding_window, **kwargs)
    kwargs.pop("is_causal", None)  # decided per document below
    if varlen_applies(query, kwargs.get("dropout", 0.0)):
        return varlen_forward(query, key, value, cu_seq_lens_q, max_length_q, kwargs.get("scaling"),
                              sliding_window), None
    cu = cu_seq_lens_q.tolist()
    lengths = [e - s for s, e in zip(cu[:-1], cu[1:])]
    # split, not slicing: its backward is one cat, where each slice's would be a zero-filled [T] gradient
    outs = []
    for n, q, k, v in zip(lengths, *(t.split(lengths, dim=2) for t in (query, key, value))):
        mask = None  # causal, the kernel's own is_causal path
        if sliding_window is not None and n > sliding_window:
            mask = _window_mask(n, sliding_window, query.device)
        o, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)
        outs.append(o)
    # A fresh tensor in the standard layout whatever the number of documents: sdpa's output can be a view with an
    # odd stride on its size-1 batch dim, and a compiled block after it (parallel.compile) would recompile on each.
    out = outs[0].clone(memory_format=torch.contiguous_format) if len(outs) == 1 else torch.cat(outs, dim=1)
    if out.stride() != torch.empty(out.shape, device="meta").stride():
        out = out.clone(memory_format=torch.contiguous_format)
    return out, None


def _unpacked(module, query, key, value, attention_mask, sliding_window, **kwargs):
    """Rows that are one sequence each (padding, if any, is in `attention_mask`, built by `_mask`)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and sliding_window is not None and kv_len > sliding_window:
        if q_len != kv_len:
            raise RuntimeError(f"{NAME}: no sliding-window mask for a cached decode; use attn sdpa for generation")
        attention_mask = _window_mask(q_len, sliding_window, query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _mask(*args, attention_mask=None, **kwargs):
    """transformers' sdpa mask where there is padding; None otherwise (causal, or a packed row that
    `packed_sdpa` cuts by cu_seq_lens_q instead of a [T, T] mask)."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def applies(language_model, attn_impl: str) -> bool:
    """sdpa on a causal decoder (not Gemma-style bidirectional attention)."""
    return attn_impl == "sdpa" and not getattr(language_model.config, "use_bidirectional_attention", False)


def use_on(language_model, attn_impl: str) -> bool:
    """Switch the text decoder's attention to the per-document SDPA where it applies; returns whether it did.
    Only for a model that is fed packed rows with `packed_kwargs` (the engine's training model)."""
    if not applies(language_model, attn_impl):
        return False
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, _mask)
    language_model.set_attn_implementation(NAME)  # transformers' public switch (5.24)
    return True
