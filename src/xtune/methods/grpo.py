"""Online RL (`xtune grpo`): GRPO, Dr. GRPO, DAPO, GSPO and RLOO on the same engine as sft and dpo.

The method gives the engine its step source (`train_loader`: the rollouts of grpo_rollout.py, sampled on the live
policy), the FSDP root that turns a packed micro-batch of completions into the clipped policy loss (per-token
chunked log-probs, grpo_loss.py), each micro-batch's share of the loss normaliser, and the metrics under TRL 1.16
GRPOTrainer's names. The reference for beta > 0: with adapters, the base with the adapters disabled (as DPO);
otherwise a frozen copy of the initial weights (one process).
"""

from __future__ import annotations

import contextlib
import copy
import json

import torch
from torch import nn

from xtune.config.schema import RunSpec
from xtune.data.prompts import PromptSet
from xtune.data.types import IGNORE_INDEX
from xtune.engine.samples import display
from xtune.errors import ConfigError
from xtune.methods.base import Method
from xtune.methods.grpo_loss import STATS, LossConfig, normaliser, policy_loss
from xtune.methods.grpo_rollout import Rollouts
from xtune.methods.grpo_sample import Completion, pack
from xtune.methods.reference_logps import adapters_disabled
from xtune.ops.logprobs import doc_index_of, linear_token_logprobs


class GrpoLossModel(nn.Module):
    """The FSDP root of a grpo run: trunk + chunked per-token log-probs + the policy loss, in one forward."""

    def __init__(self, model: nn.Module, adapter, attn_impl: str, spec: RunSpec, loss_mode: str):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.attn_impl = attn_impl
        self.cfg = LossConfig.of(spec.grpo)
        self.chunk_size = spec.loss.chunk_size
        self.mode = "eager" if loss_mode == "eager" else "chunk"  # liger has no log-prob kernel

    def token_logprobs(self, batch, with_entropy: bool = False):
        hidden, _ = self.adapter.hidden_states(self.model, batch, self.attn_impl)
        labels = batch.labels.reshape(-1)
        return linear_token_logprobs(hidden.reshape(labels.shape[0], -1), self.adapter.output_weight(self.model),
                                     labels, mode=self.mode, chunk_size=self.chunk_size, with_entropy=with_entropy)

    def forward(self, batch, logps_only: bool = False):
        """(policy loss numerator, None, statistic sums [STATS + entropy]); `logps_only`: the per-token log-probs."""
        if logps_only:
            return self.token_logprobs(batch)[0]
        logp, entropy = self.token_logprobs(batch, with_entropy=True)
        labels = batch.labels.reshape(-1)
        doc = doc_index_of(batch.cu_seqlens, labels.shape[0])[labels != IGNORE_INDEX]
        numerator, stats = policy_loss(self.cfg, logp, batch.advantages, doc, old_logp=batch.old_logp,
                                       ref_logp=batch.ref_logp, keep=batch.keep)
        live = batch.keep.index_select(0, doc)
        return numerator, None, torch.cat([stats.float(), (entropy * live).sum().reshape(1)])


class GrpoMethod(Method):
    stat_names = STATS + ("entropy",)

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        self.rollouts = None
        self.reference = None  # a frozen copy of the initial root (beta > 0 without adapters)

    def train_loader(self, spec: RunSpec, tokenizer, denv):
        # Prompts are read and tokenised here, before any model is built: a bad record stops the run first.
        self.rollouts = Rollouts(spec, PromptSet(spec, tokenizer), denv)
        return self.rollouts

    def root(self, model, adapter, attn_impl, loss_mode):
        return GrpoLossModel(model, adapter, attn_impl, self.spec, loss_mode)

    def normaliser(self, batch) -> float:
        kept = int(batch.doc_trained_tokens[batch.keep.to(batch.doc_trained_tokens.device)].sum())
        return normaliser(self.spec.grpo.loss, int(batch.advantages.shape[0]), kept, self.spec.gen.max_new_tokens)

    def forward(self, root, batch, split="train"):
        return root(batch)

    def metrics(self, sums: list[float], normaliser_total: float) -> dict[str, float]:
        s = dict(zip(self.stat_names, sums))
        tokens = s["tokens"] if s["tokens"] > 0 else float("nan")
        out = dict(self.rollouts.metrics) if self.rollouts is not None else {}
        out.update({"clip_ratio/low_mean": s["clip_low"] / tokens, "clip_ratio/high_mean": s["clip_high"] / tokens,
                    "clip_ratio/region_mean": s["clip_region"] / tokens, "entropy": s["entropy"] / tokens})
        if self.spec.grpo.beta > 0:
            out["kl"] = s["kl"] / tokens
        return out

    def prepare(self, trainer) -> None:
        if self.rollouts is None:
            raise ConfigError(["grpo: the trainer was given a loader; grpo samples its own batches (train_loader)"])
        self.rollouts.trainer = trainer
        if hasattr(trainer.root, "reshard"):
            # FSDP2 initialises lazily at the first forward of its root: the first rollout generates before any
            # training forward, so one no-grad forward of the root comes first (else the blocks initialise as roots).
            tok = trainer.tokenizer.pad_token_id or 0
            with torch.no_grad():
                trainer.root(pack([[tok]], [Completion([tok], False)], torch.zeros(1), torch.ones(1, dtype=torch.bool))
                             .to(trainer.device), logps_only=True)
            trainer.root.reshard()
        if self.spec.grpo.beta > 0 and not trainer.peft:
            if trainer.denv.world_size > 1:
                raise ConfigError([f"grpo.beta={self.spec.grpo.beta} with full tuning on {trainer.denv.world_size} "
                                   "ranks: the frozen reference copy is one-process only; use peft=lora (the base is "
                                   "the reference) or grpo.beta=0"])
            # prepare runs before a resume loads its checkpoint: this copy holds the initial weights
            self.reference = copy.deepcopy(trainer.root).eval().requires_grad_(False)

    @torch.no_grad()
    def annotate(self, trainer, batches) -> None:
        """Per-token log-probs a rollout's later passes need: the sampling policy's (num_iterations > 1) and the
        reference's (beta > 0), one no-grad pass over each micro-batch."""
        g = self.spec.grpo
        for mb in batches:
            dev = mb.to(trainer.device)
            if g.num_iterations > 1:
                mb.old_logp = trainer.root(dev, logps_only=True).float().cpu()
            if g.beta > 0:
                if self.reference is not None:
                    mb.ref_logp = self.reference(dev, logps_only=True).float().cpu()
                else:
                    with adapters_disabled(trainer.model) if trainer.peft else contextlib.nullcontext():
                        mb.ref_logp = trainer.root(dev, logps_only=True).float().cpu()
        if hasattr(trainer.root, "reshard"):
            trainer.root.reshard()

    def log_samples(self, trainer, step: int) -> None:
        """Every train.sample_every steps: a prompt and completion of each group with its reward (samples.jsonl, the
        log and TensorBoard text), from the rollout step `step` trains on."""
        t = self.spec.train
        if not (t.sample_every and step % t.sample_every == 0 and trainer.denv.is_main):
            return
        with open(trainer.run_dir / "samples.jsonl", "a") as f:
            for s in self.rollouts.samples:
                f.write(json.dumps({"step": step, **s}, default=str) + "\n")
        for i, s in enumerate(self.rollouts.samples):
            line = f"{display(str(s['prompt']), 80)} -> {display(s['completion'])} (reward {s['reward']:.3g})"
            if i < 2:
                trainer.logger.message(f"sample @ step {step}> {line}")
            trainer.logger.text(f"samples/{i}", line, step)
