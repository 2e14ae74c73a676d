"""Preference tuning on (chosen, rejected) pairs: DPO, IPO, SimPO and ORPO.

Each pair is two documents of one packed row (data/preference.py). The root module runs the trunk once
over the row, takes each document's sum of label log-probs from the chunked head (ops/logprobs.py) and
turns each pair into its loss; the engine divides the sum over a global batch by its number of pairs, so
the loss is the mean over pairs whatever the split across ranks and micro-batches.

With pi = log pi(y|x) summed over the response tokens, ref = the same under the reference model,
n = the response's trained tokens, and h the loss's margin:
  dpo    h = beta ((pi_c - ref_c) - (pi_r - ref_r))     loss = -(1-eps) log s(h) - eps log s(-h)
  ipo    h = (pi_c - ref_c) - (pi_r - ref_r)             loss = (h - 1 / (2 beta))^2
  simpo  h = beta (pi_c / n_c - pi_r / n_r) - gamma       loss = -(1-eps) log s(h) - eps log s(-h)
  orpo   a = pi / n,  h = log odds(a_c) - log odds(a_r),  log odds(a) = a - log(1 - e^a)
                                                         loss = -a_c - lambda log s(h)
Rewards (TRL's metrics): beta (pi - ref) with a reference; beta pi / n (simpo), lambda pi / n (orpo) without.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xtune.config.schema import RunSpec, needs_reference
from xtune.data.types import PackedBatch
from xtune.methods.base import Method
from xtune.methods.reference_logps import reference_logps
from xtune.ops.logprobs import doc_index_of, linear_doc_logprobs

# The papers' inverse temperatures (see PrefSpec.loss); orpo's coefficient is pref.orpo_lambda.
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


def beta_of(pref) -> float:
    if pref.loss == "orpo":
        return float(pref.orpo_lambda)
    return float(pref.beta if pref.beta is not None else DEFAULT_BETA[pref.loss])


def pair_losses(pref, pi_c, pi_r, n_c, n_r, ref_c=None, ref_r=None):
    """(per-pair loss [P], chosen rewards [P], rejected rewards [P]) in fp32; rewards carry no gradient."""
    beta, eps = beta_of(pref), float(pref.label_smoothing)
    if pref.loss in ("dpo", "ipo"):
        lr_c, lr_r = pi_c - ref_c, pi_r - ref_r
        if pref.loss == "dpo":
            h = beta * (lr_c - lr_r)
            loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        else:
            loss = (lr_c - lr_r - 1.0 / (2.0 * beta)) ** 2
        return loss, (beta * lr_c).detach(), (beta * lr_r).detach()
    a_c, a_r = pi_c / n_c, pi_r / n_r
    if pref.loss == "simpo":
        h = beta * (a_c - a_r) - float(pref.simpo_gamma)
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif pref.loss == "orpo":
        # log(1 - e^a) for a < 0; clamped so a pair whose mean log-prob rounds to 0 stays finite.
        h = (a_c - a_r) - (torch.log1p(-a_c.exp().clamp_max(1 - 1e-7)) - torch.log1p(-a_r.exp().clamp_max(1 - 1e-7)))
        loss = -a_c - beta * F.logsigmoid(h)
    else:
        raise ValueError(f"unknown preference loss {pref.loss!r}")
    return loss, (beta * a_c).detach(), (beta * a_r).detach()


class PrefLossModel(nn.Module):
    """The FSDP root of a preference run: trunk + chunked per-document log-probs + the pair loss, in one forward
    (so lm_head is unsharded there, as for engine.objective.LossModel)."""

    def __init__(self, model: nn.Module, adapter, attn_impl: str, spec: RunSpec, loss_mode: str):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.attn_impl = attn_impl
        self.pref = spec.pref
        self.chunk_size = spec.loss.chunk_size
        self.mode = "eager" if loss_mode == "eager" else "chunk"  # liger has no log-prob kernel

    def doc_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        hidden, _ = self.adapter.hidden_states(self.model, batch, self.attn_impl)
        labels = batch.labels.reshape(-1)
        docs = doc_index_of(batch.cu_seqlens, labels.shape[0])
        return linear_doc_logprobs(hidden.reshape(labels.shape[0], -1), self.adapter.output_weight(self.model),
                                   labels, docs, int(batch.cu_seqlens.numel() - 1), mode=self.mode,
                                   chunk_size=self.chunk_size)

    def forward(self, batch: PackedBatch, reference: torch.Tensor | None = None, logps_only: bool = False):
        """(sum of pair losses, None, statistic sums [len(STATS)]); `reference` [P, 2] (chosen, rejected).
        `logps_only`: the per-pair log-probs [P, 2] alone (the reference pass)."""
        logps = self.doc_logprobs(batch)
        if logps_only:
            return logps[batch.pair_docs]
        pairs = batch.pair_docs
        counts = batch.doc_trained_tokens.to(logps.device).float()
        pi_c, pi_r = logps[pairs[:, 0]], logps[pairs[:, 1]]
        ref_c = ref_r = None
        if reference is not None:
            ref_c, ref_r = reference[:, 0].float(), reference[:, 1].float()
        loss, rw_c, rw_r = pair_losses(self.pref, pi_c, pi_r, counts[pairs[:, 0]], counts[pairs[:, 1]], ref_c, ref_r)
        stats = torch.stack([rw_c.sum(), rw_r.sum(), (rw_c > rw_r).float().sum(), (rw_c - rw_r).sum(),
                             pi_c.detach().sum(), pi_r.detach().sum()])
        return loss.sum(), None, stats


class PreferenceMethod(Method):
    stat_names = STATS

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        self.use_reference = spec.pref.reference == "init" or (
            spec.pref.reference == "auto" and needs_reference(spec.pref.loss))
        self.reference: dict[str, torch.Tensor] = {}  # split -> [num_pairs, 2] float64, indexed by pair id

    def root(self, model, adapter, attn_impl, loss_mode):
        return PrefLossModel(model, adapter, attn_impl, self.spec, loss_mode)

    def normaliser(self, batch):
        return float(batch.num_pairs)

    def forward(self, root, batch, split="train"):
        ref = None
        if self.use_reference:
            ref = self.reference[split].to(batch.pair_ids.device).index_select(0, batch.pair_ids)
        return root(batch, ref)

    def metrics(self, sums: list[float], normaliser: float) -> dict[str, float]:
        n = normaliser if normaliser > 0 else float("nan")
        return {name: s / n for name, s in zip(self.stat_names, sums)}

    def prepare(self, trainer) -> None:
        if self.use_reference:
            self.reference = reference_logps(trainer, self)
