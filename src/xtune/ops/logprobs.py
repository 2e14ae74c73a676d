"""Per-document sums of label log-probs over the output projection, without [tokens x vocab] logits.

`linear_doc_logprobs(hidden, weight, labels, doc_index, num_docs)` returns [num_docs] fp32 with
sum_{i in doc d, label_i != -100} log softmax(hidden_i @ weight.T)[label_i]: what preference losses
(DPO and its family) read. It sits beside `loss.linear_cross_entropy` with the same memory behaviour
(only trained tokens, `chunk_size` rows at a time, one [chunk, V] fp32 buffer reused in place), but a
sequence loss is a non-linear function of these sums, so the gradient cannot be finished in forward as
the chunked CE does: the forward keeps only each token's log-sum-exp, and the backward recomputes
each chunk's logits once, scaled per token by the incoming gradient of its document.

`linear_token_logprobs(hidden, weight, labels)` returns the same log-probs one per trained token (and, on request,
each one's entropy, without gradient): what token-level RL losses (GRPO and its family) read. Its backward is the
same recomputation with each token's own incoming gradient.

`eager` builds the full logits and calls log_softmax: the reference.
"""

from __future__ import annotations

import torch

from xtune.data.types import IGNORE_INDEX
from xtune.errors import XtuneError


class _ChunkedLinearDocLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, doc_index, num_docs, chunk_size):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        out = torch.zeros(num_docs, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            buf = (hidden.index_select(0, idx) @ weight.t()).float()  # [c, V]
            target = buf.gather(1, labels.index_select(0, idx)[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a second [c, V] buffer: +60% peak memory)
            row_max = buf.amax(dim=1)
            lse = buf.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            lse_all[start:start + idx.numel()] = lse
            out.index_add_(0, doc_index.index_select(0, idx), target - lse)
            del buf
        ctx.save_for_backward(hidden, weight, labels, doc_index, rows, lse_all)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, doc_index, rows, lse_all = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_dh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        g_tok = grad_out.float().index_select(0, doc_index.index_select(0, rows))  # d loss / d logp_i
        _backward_chunks(hidden, weight, labels, rows, lse_all, g_tok, ctx.chunk_size, grad_h, grad_w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def _backward_chunks(hidden, weight, labels, rows, lse_all, g_tok, chunk_size, grad_h, grad_w) -> None:
    """The shared backward of the chunked log-probs: for the trained rows (`rows`, with their log-sum-exp and d loss /
    d logp_i in `g_tok`), recompute one chunk of logits at a time and accumulate into grad_h / grad_w (None: skipped)."""
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start:start + chunk_size]
        g = g_tok[start:start + idx.numel()]
        h = hidden.index_select(0, idx)
        buf = (h @ weight.t()).float()
        # d logp_i / d logits_i = onehot(label_i) - softmax_i, times g_i: buf becomes -g * softmax + g * onehot
        buf.sub_(lse_all[start:start + idx.numel(), None]).exp_().mul_(-g[:, None])
        buf[torch.arange(idx.numel(), device=buf.device), labels.index_select(0, idx)] += g
        if grad_h is not None:
            grad_h.index_copy_(0, idx, (buf.to(weight.dtype) @ weight).to(grad_h.dtype))
        if grad_w is not None:
            grad_w.addmm_(buf.t(), h.float())
        del buf


class _ChunkedLinearTokenLogprobs(torch.autograd.Function):
    """[N] log-probs of the N trained tokens (labels != -100, in order) and their entropies [N] (or an empty tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, with_entropy):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        out = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        ent = torch.empty(rows.numel() if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            sl = slice(start, start + idx.numel())
            buf = (hidden.index_select(0, idx) @ weight.t()).float()  # [c, V]
            target = buf.gather(1, labels.index_select(0, idx)[:, None]).squeeze(1)
            row_max = buf.amax(dim=1)
            z = buf.sub_(row_max[:, None])
            if with_entropy:  # H = log sum e^z - sum p z  (one more [c, V] buffer, only when asked)
                e = z.exp()
                s = e.sum(dim=1)
                ent[sl] = s.log() - (e.mul_(z)).sum(dim=1) / s
                lse = s.log_().add_(row_max)
                del e
            else:
                lse = z.exp_().sum(dim=1).log_().add_(row_max)
            lse_all[sl] = lse
            out[sl] = target - lse
            del buf
        ctx.save_for_backward(hidden, weight, labels, rows, lse_all)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_ent):
        hidden, weight, labels, rows, lse_all = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_dh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        _backward_chunks(hidden, weight, labels, rows, lse_all, grad_out.float(), ctx.chunk_size, grad_h, grad_w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, mode: str = "chunk",
                          chunk_size: int = 1024, with_entropy: bool = False):
    """(log-probs [N] fp32, entropies [N] fp32 without gradient, or None) of the N tokens whose label is not -100,
    in row order. hidden [T, H], weight [V, H], labels [T] (shifted). `mode`: chunk or eager (the reference)."""
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"expected hidden [T, H] and labels [T]; got {tuple(hidden.shape)}, {tuple(labels.shape)}")
    if mode == "eager":
        trained = labels != IGNORE_INDEX
        logp = torch.log_softmax((hidden[trained] @ weight.t()).float(), dim=-1)
        tok = logp.gather(1, labels[trained][:, None]).squeeze(1)
        ent = -(logp.exp() * logp).sum(dim=1).detach() if with_entropy else None
        return tok, ent
    if chunk_size < 1:
        raise XtuneError(f"loss.chunk_size must be >= 1, got {chunk_size}")
    tok, ent = _ChunkedLinearTokenLogprobs.apply(hidden, weight, labels, int(chunk_size), bool(with_entropy))
    return tok, (ent if with_entropy else None)


def _eager(hidden, weight, labels, doc_index, num_docs):
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    trained = labels != IGNORE_INDEX
    tok = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1) * trained
    return torch.zeros(num_docs, dtype=torch.float32, device=hidden.device).index_add(0, doc_index, tok)


def doc_index_of(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] long: the document of each token, from cu_seqlens."""
    bounds = cu_seqlens.to(dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(bounds) - 1, device=bounds.device), bounds[1:] - bounds[:-1],
                                   output_size=num_tokens)


def linear_doc_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, doc_index: torch.Tensor,
                        num_docs: int, *, mode: str = "chunk", chunk_size: int = 1024) -> torch.Tensor:
    """[num_docs] fp32 sums of label log-probs per document. hidden [T, H], weight [V, H], labels [T] (shifted),
    doc_index [T] long. `mode`: chunk (liger is not a log-prob kernel: it falls back to chunk) or eager."""
    if hidden.dim() != 2 or labels.shape != doc_index.shape or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"expected hidden [T, H], labels [T], doc_index [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(doc_index.shape)}")
    if mode == "eager":
        return _eager(hidden, weight, labels, doc_index, num_docs)
    if chunk_size < 1:
        raise XtuneError(f"loss.chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearDocLogprobs.apply(hidden, weight, labels, doc_index, int(num_docs), int(chunk_size))
