"""Ulysses sequence parallelism (`parallel.sp_size`): one packed row is cut over the `sp` ranks of an SP group.

Each rank runs embeddings, norms, MLPs and the loss head on its contiguous piece of the row. Around attention an
all-to-all swaps sequence-sharding for head-sharding, so each rank attends over the whole row for `heads / sp`
heads, then swaps back. This is plugged in through transformers' public `AttentionInterface` registry as
`xtune_sp_<inner>` wrapping the model's own sdpa / eager / flash function; model code is untouched.

Document isolation uses the full row's `cu_seqlens`, passed down the model as `cu_seq_lens_q` (the kwarg
transformers forwards to every attention call, also when activation checkpointing recomputes a block). The
position ids of the full row are cut with the inputs, so RoPE sees global positions.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import AttentionInterface

from xtune.data.types import IGNORE_INDEX, PackedBatch
from xtune.ops import packed_sdpa

PREFIX = "xtune_sp_"
_STATE: dict = {"group": None}  # this process's SP group (one per process; set once by `register`)


@dataclass(frozen=True)
class SeqParallel:
    """This rank's place in its SP group."""

    size: int
    rank: int
    group: object = field(default=None, compare=False)  # the SP process group (statistics over the whole row)

    def piece(self, total: int) -> slice:
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def share(self, padded: int, real: int) -> RowShare:
        """This rank's share of a row of `real` tokens padded to `padded` (see pad_batch)."""
        p = self.piece(padded)
        return RowShare(self.group, min(max(real - p.start, 0), p.stop - p.start))


@dataclass(frozen=True)
class RowShare:
    """What a statistic over the whole row (the MoE load-balancing loss) needs of this rank's piece: the first
    `real` tokens of the piece are the row's, the rest are the padding pseudo-document; `group` holds the
    row's other pieces."""

    group: object
    real: int


# ------------------------------------------------------------------------------------------- all-to-all


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    send = [c.contiguous() for c in x.chunk(n, dim=scatter_dim)]
    recv = [torch.empty_like(c) for c in send]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` over the group, gather `gather_dim`; the backward is the inverse swap."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# ------------------------------------------------------------------------------------------- attention


class _HeadsView:
    """The attention module as the inner function sees it after the swap: its own attributes, but the
    query/key head ratio of the local heads (KV heads may have been repeated)."""

    def __init__(self, module, groups: int):
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name):
        return getattr(self._module, name)


def _kv_repeat(heads: int, kv_heads: int, sp: int) -> int:
    """How many times to repeat each KV head so that the KV heads split evenly over sp ranks and each rank's
    query heads find theirs locally: the smallest r with sp | kv*r and (kv*r) | heads."""
    r = 1
    while (kv_heads * r) % sp or heads % (kv_heads * r):
        r += 1
    return r


def _inner(name: str, module):
    if name == "eager":
        # The model file's own eager function (transformers 5.x defines one per model module, not in the registry).
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface()[name]


def _causal_mask(n: int, dtype, device) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)
    return mask[None, None]


def _make_sp_attention(inner_name: str):
    @torch.compiler.disable  # collectives and a per-document loop: eager under parallel.compile (fsdp.compile_blocks)
    def attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                  max_length_q=None, max_length_k=None, position_ids=None, **kwargs):
        group = _STATE["group"]
        sp = dist.get_world_size(group)
        if cu_seq_lens_q is None:
            raise RuntimeError("sequence parallel attention needs the full row's cu_seq_lens_q")
        heads, kv_heads = query.shape[1], key.shape[1]
        r = _kv_repeat(heads, kv_heads, sp)
        if r > 1:  # fewer KV heads than ranks: repeat them (in place of the grouped-query broadcast)
            key, value = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)
        # [B, heads, T/sp, D] -> [B, heads/sp, T, D]
        q, k, v = (all_to_all(t, 1, 2, group) for t in (query, key, value))
        view = _HeadsView(module, q.shape[1] // k.shape[1])
        fn = _inner(inner_name, module)
        cu = cu_seq_lens_q.tolist()
        if inner_name == "sdpa" and packed_sdpa.varlen_applies(q, kwargs.get("dropout", 0.0)):
            out = packed_sdpa.varlen_forward(q, k, v, cu_seq_lens_q, max_length_q, kwargs.get("scaling"),
                                             kwargs.get("sliding_window"))
        elif inner_name.startswith("flash"):
            out, _ = fn(view, q, k, v, None, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_q,
                        max_length_q=max_length_q, max_length_k=max_length_q, **kwargs)
        else:
            # One causal call per document of the full row: no [T, T] mask is ever built.
            outs = []
            for s, e in zip(cu[:-1], cu[1:]):
                mask = _causal_mask(e - s, q.dtype, q.device) if inner_name == "eager" else None
                o, _ = fn(view, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], mask, **kwargs)
                outs.append(o)
            out = torch.cat(outs, dim=1)
        # [B, T, heads/sp, D] -> [B, T/sp, heads, D]
        return all_to_all(out, 1, 2, group), None

    return attention


def register(group) -> None:
    """Make this process's SP group known and register `xtune_sp_<inner>` for each inner attention."""
    _STATE["group"] = group
    for inner in ("sdpa", "eager", "flash_attention_2"):
        AttentionInterface.register(PREFIX + inner, _make_sp_attention(inner))


def attn_name(inner: str) -> str:
    return PREFIX + inner


def use_on(language_model, inner: str) -> None:
    """Switch the text decoder's attention to the SP wrapper (a vision tower keeps its own). The name is not a
    mask function, so transformers builds no mask for the piece: the wrapper isolates documents itself."""
    language_model.set_attn_implementation(attn_name(inner))  # transformers' public switch (5.24)


# ------------------------------------------------------------------------------------------- the row


def pad_batch(batch: PackedBatch, sp: int) -> PackedBatch:
    """Pad the row to a multiple of sp with one untrained pseudo-document."""
    total = batch.num_tokens
    pad = -total % sp
    if not pad:
        return batch
    dev = batch.input_ids.device
    ext = lambda t, v: torch.cat([t, torch.full((1, pad), v, dtype=t.dtype, device=dev)], 1)  # noqa: E731
    positions = torch.cat([batch.position_ids, torch.arange(pad, device=dev)[None]], 1)
    cu = torch.cat([batch.cu_seqlens, batch.cu_seqlens.new_tensor([total + pad])])
    trained = batch.doc_trained_tokens
    if trained is not None:
        trained = torch.cat([trained, trained.new_zeros(1)])
    return PackedBatch(input_ids=ext(batch.input_ids, 0), labels=ext(batch.labels, IGNORE_INDEX),
                       position_ids=positions, cu_seqlens=cu, max_seqlen=max(batch.max_seqlen, pad),
                       pixel_values=batch.pixel_values, doc_trained_tokens=trained,
                       pair_docs=batch.pair_docs, pair_ids=batch.pair_ids)


@contextlib.contextmanager
def cut_inputs(language_model, sp: SeqParallel):
    """While active, the text decoder receives only this rank's piece of its inputs (ids or merged embeddings,
    which already hold the image features) and of the full row's position ids."""

    def cut(_module, args, kwargs):
        for name in ("input_ids", "inputs_embeds", "position_ids"):
            t = kwargs.get(name)
            if t is not None:
                kwargs[name] = t[:, sp.piece(t.shape[1])]
        return args, kwargs

    hook = language_model.register_forward_pre_hook(cut, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
