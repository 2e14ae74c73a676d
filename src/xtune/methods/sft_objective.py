"""The training objective: per-token weights of the loss reductions and the module that computes the loss.

loss = sum_i w_i * CE_i / W, where W is the sum of w_i over every trained token of the global batch
(all micro-batches, all ranks). The per-token weights are
  token:  w = 1                (every trained token weighs the same)
  sample: w = 1 / n_doc        (every document weighs the same)
  square: w = 1 / sqrt(n_doc)  (in between)
with n_doc the number of trained tokens of the token's document.
"""

from __future__ import annotations

import torch
from torch import nn

from xtune.data.types import IGNORE_INDEX, PackedBatch
from xtune.ops.loss import linear_cross_entropy
from xtune.parallel import ulysses


def token_weights(batch: PackedBatch, reduction: str) -> torch.Tensor | None:
    """Per-token weights [T] (float32), zero where the label is ignored; None means all ones."""
    labels = batch.labels.reshape(-1)
    trained = labels != IGNORE_INDEX
    if reduction == "token":
        return None
    bounds = batch.cu_seqlens.to(device=labels.device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    if batch.doc_trained_tokens is not None:
        per_doc = batch.doc_trained_tokens.to(device=labels.device, dtype=torch.float32)
    else:
        doc_of = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths)
        per_doc = torch.zeros(len(lengths), device=labels.device).index_add_(0, doc_of, trained.float())
    n = torch.repeat_interleave(per_doc, lengths).clamp_min(1.0)
    w = 1.0 / n if reduction == "sample" else n.rsqrt()
    return torch.where(trained, w, torch.zeros_like(w))


def weight_sum(batch: PackedBatch, reduction: str) -> float:
    """This micro-batch's share of W (the loss normaliser)."""
    w = token_weights(batch, reduction)
    if w is None:
        return float((batch.labels != IGNORE_INDEX).sum())
    return float(w.double().sum())


class LossModel(nn.Module):
    """Runs the model trunk and the loss head in one forward.

    This module is the FSDP root: the parameters outside the transformer blocks (embeddings, final
    norm, lm_head) belong to its FSDP group, so they are unsharded for the whole forward and the
    loss reads a plain lm_head weight; its gradient is reduce-scattered like any other. The weights
    are computed here from integer tensors, so FSDP's input casting (mixed precision) cannot round them.
    """

    def __init__(self, model: nn.Module, adapter, attn_impl: str, loss_spec, loss_mode: str):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.attn_impl = attn_impl
        self.loss_spec = loss_spec
        self.loss_mode = loss_mode
        self.sp = None  # engine/ulysses.SeqParallel under sequence parallelism: this rank runs one piece of the row

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sp is None:
            hidden, aux = self.adapter.hidden_states(self.model, batch, self.attn_impl)
            labels = batch.labels.reshape(-1)
            weights = token_weights(batch, self.loss_spec.reduction)
        else:
            real = batch.num_tokens
            batch = ulysses.pad_batch(batch, self.sp.size)
            share = self.sp.share(batch.num_tokens, real)
            with ulysses.cut_inputs(self.adapter.language_model(self.model), self.sp):
                hidden, aux = self.adapter.hidden_states(self.model, batch, self.attn_impl, share=share)
            if aux is not None:
                # aux is this rank's part of the row's aux loss (the parts sum to it over the SP group); the
                # trainer averages aux over all ranks, sp of which share one row: times sp, as at sp=1.
                aux = aux * self.sp.size
            # The full row's labels (already shifted within documents) and weights, cut like the inputs:
            # a piece boundary between a token and its label loses nothing.
            piece = self.sp.piece(batch.num_tokens)
            labels = batch.labels.reshape(-1)[piece]
            weights = token_weights(batch, self.loss_spec.reduction)
            weights = None if weights is None else weights[piece]
        ce_sum = linear_cross_entropy(
            hidden.reshape(labels.shape[0], -1),
            self.adapter.output_weight(self.model),
            labels,
            weights,
            mode=self.loss_mode,
            chunk_size=self.loss_spec.chunk_size,
        )
        return ce_sum, aux
