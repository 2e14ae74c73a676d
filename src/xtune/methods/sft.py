"""Supervised fine-tuning: token-weighted cross-entropy over the trained tokens (engine/objective.py)."""

from __future__ import annotations

from xtune.methods.base import Method
from xtune.methods.sft_objective import LossModel, weight_sum


class SftMethod(Method):
    def root(self, model, adapter, attn_impl, loss_mode):
        self._root = LossModel(model, adapter, attn_impl, self.spec.loss, loss_mode)
        return self._root

    def normaliser(self, batch):
        # The root's loss spec is the one source of the reduction (the loss and its normaliser must agree).
        spec = self._root.loss_spec if hasattr(self, "_root") else self.spec.loss
        return weight_sum(batch, spec.reduction)

    def forward(self, root, batch, split="train"):
        ce_sum, aux = root(batch)
        return ce_sum, aux, None
