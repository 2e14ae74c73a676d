"""Supervised fine-tuning: token-weighted cross-entropy over the trained tokens (engine/objective.py)."""

from __future__ import annotations

from xtune.engine.objective import LossModel, weight_sum
from xtune.methods.base import Method


class SftMethod(Method):
    def root(self, model, adapter, attn_impl, loss_mode):
        return LossModel(model, adapter, attn_impl, self.spec.loss, loss_mode)

    def normaliser(self, batch):
        return weight_sum(batch, self.spec.loss.reduction)

    def forward(self, root, batch, split="train"):
        ce_sum, aux = root(batch)
        return ce_sum, aux, None
