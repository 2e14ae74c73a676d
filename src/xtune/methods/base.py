"""The interface a training method implements for the engine (engine/trainer.py)."""

from __future__ import annotations

import torch
from torch import nn

from xtune.config.schema import RunSpec
from xtune.data import build_train_loader
from xtune.data.types import PackedBatch


class Method:
    """Global-batch loss = sum over micro-batches and ranks of `forward(...)[0]` / sum of `normaliser(...)`."""

    # Names of the per-micro-batch statistic sums `forward` returns (all-reduced, then `metrics`).
    stat_names: tuple[str, ...] = ()

    def __init__(self, spec: RunSpec):
        self.spec = spec

    def train_loader(self, spec: RunSpec, tokenizer, denv):
        """The step source: `next()` gives this rank's micro-batches of one optimizer step, with `state_dict`,
        `load_state_dict` and `total_steps` (sft and dpo: the data stage's loader; grpo: its rollouts)."""
        return build_train_loader(spec, tokenizer, dp_rank=denv.dp_rank, dp_size=denv.dp_size, rank=denv.rank)

    def root(self, model: nn.Module, adapter, attn_impl: str, loss_mode: str) -> nn.Module:
        """The FSDP root: holds the HF model as `.model`."""
        raise NotImplementedError

    def normaliser(self, batch: PackedBatch) -> float:
        """This micro-batch's share of the loss normaliser W."""
        raise NotImplementedError

    def forward(self, root: nn.Module, batch: PackedBatch, split: str = "train"
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss numerator, aux loss or None, statistic sums [len(stat_names)] or None)."""
        raise NotImplementedError

    def metrics(self, sums: list[float], normaliser: float) -> dict[str, float]:
        """The statistics of a global batch, from their all-reduced sums."""
        return {}

    def prepare(self, trainer) -> None:
        """Runs once before the first step (and before a resume loads its checkpoint)."""
