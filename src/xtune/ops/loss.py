"""Cross-entropy over the output projection, without building [tokens x vocab] logits.

`linear_cross_entropy(hidden, weight, labels, token_weights)` returns the *sum* over trained tokens
(labels != -100) of `w_i * CE_i`, accumulated in fp32. The engine divides by the global trained-token
count (or applies sample/square weights through `token_weights`), which keeps the loss invariant to
how a global batch is split across ranks and micro-batches.

Modes:
  chunk  a custom autograd Function (`_ChunkedLinearCE`): only the trained tokens are processed,
         `chunk_size` at a time; the gradients wrt hidden and weight are computed in the forward pass
         (one [chunk, V] buffer, reused in place for logits -> softmax -> dlogits), so backward only
         scales them. Peak extra memory: chunk_size x V (fp32) + the [V, H] fp32 weight-gradient
         accumulator, independent of the number of tokens.
  liger  Liger's fused kernel (CUDA only, optional dependency).
  eager  full logits + F.cross_entropy: the reference.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from xtune.config.schema import CHOICES
from xtune.data.types import IGNORE_INDEX
from xtune.errors import XtuneError

MODES = CHOICES["loss.mode"]


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_mode(mode: str, device) -> str:
    """`auto` -> chunk everywhere; explicit modes are checked.

    Liger is not the CUDA default: on the first GPU run its fused CE trained slower than the chunked loss
    (bench/README.md, the `gpu` benchmark). `loss.mode=liger` selects it."""
    device = torch.device(device)
    if mode not in MODES:
        raise XtuneError(f"loss.mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "chunk"
    if mode == "liger":
        if device.type != "cuda":
            raise XtuneError("loss.mode=liger needs a CUDA device (Liger's kernels are Triton); use chunk on CPU")
        if not _liger_available():
            raise XtuneError("loss.mode=liger needs liger-kernel: pip install 'xtune[gpu]' (or use loss.mode=chunk)")
    return mode


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T, label_i), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_size):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # only trained tokens cost anything
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_dh else None
        # fp32 accumulator: summing many bf16 partial products would lose precision.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None

        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            h = hidden.index_select(0, idx)
            tgt = labels.index_select(0, idx)
            # Matmul in the input dtype (tensor cores for bf16), softmax math in fp32.
            buf = (h @ weight.t()).float()  # [c, V]: the only vocab-sized buffer, reused in place below
            target_logit = buf.gather(1, tgt[:, None]).squeeze(1)
            row_max = buf.amax(dim=1, keepdim=True)
            buf.sub_(row_max).exp_()
            sum_exp = buf.sum(dim=1, keepdim=True)
            lse = row_max.squeeze(1) + sum_exp.squeeze(1).log()
            ce = lse - target_logit
            w = None if token_weights is None else token_weights.index_select(0, idx).float()
            loss += (ce if w is None else ce * w).sum()
            if not (need_dh or need_dw):
                continue
            # dCE/dlogits = softmax - onehot, scaled by the token weight.
            buf.div_(sum_exp)
            buf[torch.arange(idx.numel(), device=buf.device), tgt] -= 1.0
            if w is not None:
                buf.mul_(w[:, None])
            if need_dh:  # in the weight's dtype (bf16 matmul on GPU); a no-op cast for fp32
                grad_h.index_copy_(0, idx, (buf.to(weight.dtype) @ weight).to(grad_h.dtype))
            if need_dw:  # fp32: buf already is, h is [c, H]
                grad_w.addmm_(buf.t(), h.float())
            del buf

        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype))
        dw = None if grad_w is None else grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def _eager(hidden, weight, labels, token_weights):
    logits = (hidden @ weight.t()).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if token_weights is not None:
        ce = ce * token_weights.float()
    return ce.sum()


def _liger(hidden, weight, labels, token_weights):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # lazy: optional GPU extra

    def summed(h, y):
        return liger_fused_linear_cross_entropy(h, weight, y, ignore_index=IGNORE_INDEX, reduction="sum").float()

    if token_weights is None:
        return summed(hidden, labels)
    # Liger has no per-token weights and its gradients are computed in forward for a scalar loss,
    # so reduction="none" cannot be weighted afterwards. Token weights are constant per document
    # (sample / square reductions), so there are few distinct values: one call per value is exact.
    trained = labels != IGNORE_INDEX
    total = hidden.new_zeros((), dtype=torch.float32)
    for value in torch.unique(token_weights[trained]).tolist():
        sel = (trained & (token_weights == value)).nonzero().squeeze(1)
        if value != 0.0:
            total = total + value * summed(hidden.index_select(0, sel), labels.index_select(0, sel))
    return total


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Scalar fp32 `sum_i w_i * CE_i` over tokens with labels != -100.

    hidden [T, H], weight [V, H], labels [T] (already shifted), token_weights [T] or None.
    `mode` must be resolved (see `resolve_loss_mode`); `auto` is resolved here from hidden's device.
    """
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"expected hidden [T, H] and labels [T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if mode == "auto":
        mode = resolve_loss_mode(mode, hidden.device)
    if mode == "chunk":
        if chunk_size < 1:
            raise XtuneError(f"loss.chunk_size must be >= 1, got {chunk_size}")
        return _ChunkedLinearCE.apply(hidden, weight, labels, token_weights, int(chunk_size))
    if mode == "eager":
        return _eager(hidden, weight, labels, token_weights)
    if mode == "liger":
        return _liger(hidden, weight, labels, token_weights)
    raise XtuneError(f"unknown loss mode {mode!r}; expected one of {MODES}")
