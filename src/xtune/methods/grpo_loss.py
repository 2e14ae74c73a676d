"""The clipped policy-gradient losses of `xtune grpo` (pure functions on tensors).

Inputs are flat over the completion tokens of a micro-batch (as the packed row yields them): `logp` [N] under
the policy being trained, `old_logp` [N] under the policy that sampled (None: `logp` detached, the first pass of
a rollout), `ref_logp` [N] under the reference (KL term), `doc` [N] the completion of each token, `adv` [D] one
advantage per completion, `keep` [D] False for completions that carry no loss (mask_truncated_completions).

Per token t of completion i, with log-ratio d_t = logp_t - old_logp_t:
  token level (GRPO):    w_t = exp(d_t)
  sequence level (GSPO, Zheng et al. 2025, arXiv:2507.18071): w_t = exp(mean of d over completion i) for every t
  l_t = -min(w_t A_i, clip(w_t, 1 - epsilon, 1 + epsilon_high) A_i) + beta k3_t
  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (Schulman's unbiased, positive KL estimator)

The loss of a global batch is numerator / W, summed over micro-batches and ranks (engine/trainer.py):
  grpo    (Shao et al. 2024): numerator = sum_i mean_t l_t            W = completions
  dr_grpo (Liu et al. 2025):  numerator = sum_i sum_t l_t             W = completions x max_completion_length
  dapo    (Yu et al. 2025):   numerator = sum_i sum_t l_t             W = completion tokens of kept completions
so each is the paper's formula whatever the split of the batch into micro-batches and ranks. A completion that is
not kept contributes nothing (it still counts in grpo's and dr_grpo's W, as in TRL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Statistic sums the loss returns (engine all-reduces them); metrics divide by the active-token count.
STATS = ("tokens", "kl", "clip_low", "clip_high", "clip_region")


@dataclass(frozen=True)
class LossConfig:
    loss: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    level: str = "token"
    beta: float = 0.0

    @classmethod
    def of(cls, grpo) -> LossConfig:
        return cls(grpo.loss, grpo.epsilon, grpo.epsilon_high, grpo.importance_sampling_level, grpo.beta)

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1.0


def _per_doc_mean(values: torch.Tensor, doc: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add(0, doc, values)
    return sums / counts.clamp_min(1)


def log_importance(logp, old_logp, doc, num_docs: int, level: str) -> torch.Tensor:
    """[N] log w_t: the token's own log-ratio, or (sequence) its completion's mean log-ratio."""
    d = logp - old_logp
    if level == "token":
        return d
    if level != "sequence":
        raise ValueError(f"unknown importance_sampling_level {level!r}")
    counts = torch.bincount(doc, minlength=num_docs).to(d.dtype)
    return _per_doc_mean(d, doc, counts).index_select(0, doc)


def policy_loss(cfg: LossConfig, logp: torch.Tensor, adv: torch.Tensor, doc: torch.Tensor, *,
                old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                keep: torch.Tensor | None = None):
    """(numerator: scalar, stats: [len(STATS)] sums over the kept tokens), in fp32 (or logp's wider dtype)."""
    num_docs = adv.shape[0]
    dtype = torch.promote_types(logp.dtype, torch.float32)  # fp32 at least (fp64 in the tests)
    logp = logp.to(dtype)
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    keep_doc = torch.ones(num_docs, dtype=torch.bool, device=logp.device) if keep is None else keep.bool()
    live = keep_doc.index_select(0, doc).to(dtype)  # [N] 1 for tokens of kept completions
    a = adv.to(dtype).index_select(0, doc)
    w = torch.exp(log_importance(logp, old, doc, num_docs, cfg.level))
    clipped = torch.clamp(w, 1.0 - cfg.epsilon, 1.0 + cfg.high)
    tok = -torch.min(w * a, clipped * a)
    kl = None
    if cfg.beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3(logp, ref_logp.to(dtype))
        tok = tok + cfg.beta * kl
    tok = tok * live
    if cfg.loss == "grpo":
        counts = torch.bincount(doc, minlength=num_docs).to(tok.dtype)
        numerator = _per_doc_mean(tok, doc, counts).sum()
    elif cfg.loss in ("dr_grpo", "dapo"):
        numerator = tok.sum()
    else:
        raise ValueError(f"unknown loss {cfg.loss!r}")
    with torch.no_grad():
        low = ((w < 1.0 - cfg.epsilon) & (a < 0)).to(dtype) * live
        high = ((w > 1.0 + cfg.high) & (a > 0)).to(dtype) * live
        stats = torch.stack([live.sum(), (kl * live).sum() if kl is not None else live.new_zeros(()),
                             low.sum(), high.sum(), (low + high).sum()])
    return numerator, stats


def normaliser(loss: str, num_docs: int, kept_tokens: int, max_completion_length: int) -> float:
    """This micro-batch's share of W (see the module's docstring)."""
    if loss == "grpo":
        return float(num_docs)
    if loss == "dr_grpo":
        return float(num_docs * max_completion_length)
    if loss == "dapo":
        return float(kept_tokens)
    raise ValueError(f"unknown loss {loss!r}")
