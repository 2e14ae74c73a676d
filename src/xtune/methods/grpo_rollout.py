"""The step source of `xtune grpo`: every `grpo.num_iterations` optimizer steps, a rollout.

A rollout takes `train.global_batch_size / grpo.num_generations` prompts from the seeded prompt stream, samples
`num_generations` completions of each on the live policy (each rank its share of the prompts; the results are
gathered so that every rank holds the whole batch), scores them, and turns the rewards into advantages over the
whole batch. With `grpo.dynamic_sampling` groups whose rewards are all equal are dropped and more prompts are
sampled, at most `dynamic_sampling_max_rounds` extra rounds; a batch still short after them is filled with dropped
groups. Each rank then trains its contiguous share of the completions, `train.micro_batch_size` completions per
packed micro-batch. Log-probs of the sampling policy are kept when `num_iterations` > 1 (later passes need the
ratio to it), and the reference's when `beta` > 0.

Sampling is seeded by (train.seed, rollout index, round, the prompt's place in the round) and the stream's position
is the loader state in the checkpoint, so a resumed run samples the same prompts with the same random stream.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from xtune.data.prompts import PromptSet, PromptStream
from xtune.engine.trainer import derived_seed
from xtune.methods.grpo_advantages import advantages, zero_std_groups
from xtune.methods.grpo_rewards import Batch, build_rewards, score, total
from xtune.methods.grpo_sample import Completion, pack, sample_completions


class Rollouts:
    def __init__(self, spec, prompts: PromptSet, denv):
        self.spec, self.prompts, self.denv = spec, prompts, denv
        self.g = spec.grpo
        self.num_prompts = spec.train.global_batch_size // self.g.num_generations
        self.stream = PromptStream(len(prompts), spec.train.seed)
        self.rewards = build_rewards(self.g)
        self.step = 0
        self.current = None
        self.metrics: Dict[str, float] = {}
        self.samples: List[dict] = []
        self.trainer = None  # attached by GrpoMethod.prepare (the live model samples the completions)
        t = spec.train
        rollouts = t.max_steps or math.ceil((t.epochs or 1) * len(prompts) / self.num_prompts) * self.g.num_iterations
        self.total_steps = int(rollouts)

    def __iter__(self):
        return self

    def __next__(self):
        if self.step >= self.total_steps:
            raise StopIteration
        if self.current is None or self.step % self.g.num_iterations == 0:
            self.current = self.rollout(self.step // self.g.num_iterations)
        self.step += 1
        self.trainer.method.log_samples(self.trainer, self.step)
        return self.current

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """A resume mid-rollout (num_iterations > 1, a checkpoint between its passes) samples a fresh rollout."""
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.current = None

    # ------------------------------------------------------------------------------------------------ rollout

    def _sample_round(self, index: int, rnd: int, k: int):
        """k prompts from the stream and their completions, gathered on every rank (prompt-major)."""
        idx = self.stream.take(k)
        d, tr = self.denv, self.trainer
        comps = []
        # One generate call per prompt, seeded by its place in the rollout: the same completions on any number of ranks.
        for pos in range(d.rank, len(idx), d.world_size):
            seed = derived_seed(self.spec.train.seed, index, rnd * 1_000_003 + pos)
            comps += sample_completions(tr.root, tr.model, tr.tokenizer, [self.prompts[idx[pos]].ids],
                                        self.g.num_generations, self.spec.gen, seed, tr.device,
                                        sync_steps=d.world_size > 1)
        if d.world_size > 1:
            parts = [None] * d.world_size
            dist.all_gather_object(parts, comps)
            n = self.g.num_generations
            comps = [None] * (len(idx) * n)
            for r, part in enumerate(parts):
                for j, c in enumerate(part):
                    comps[(r + (j // n) * d.world_size) * n + j % n] = c
        return idx, comps

    def _score(self, idx: List[int], comps: List[Completion]) -> torch.Tensor:
        n, tok = self.g.num_generations, self.trainer.tokenizer
        items = [self.prompts[i] for i in idx for _ in range(n)]
        keys = sorted({k for it in items for k in it.fields})
        batch = Batch([it.prompt for it in items], [tok.decode(c.ids, skip_special_tokens=True) for c in comps],
                      [len(c.ids) for c in comps], {k: [it.fields.get(k) for it in items] for k in keys},
                      [it.source for it in items])
        self._texts = batch.completions
        return score(self.rewards, batch)

    def collect(self, index: int):
        """(prompt indices, completions, per-reward scores [B, R], groups kept) after dynamic sampling."""
        n, want = self.g.num_generations, self.num_prompts
        idx, comps = self._sample_round(index, 0, want)
        per = self._score(idx, comps)
        texts = self._texts
        if not self.g.dynamic_sampling:
            return idx, comps, per, texts, {}
        groups = list(range(len(idx)))
        zero = zero_std_groups(total(self.rewards, per), n).tolist()
        kept = [gi for gi in groups if not zero[gi]]
        dropped = [gi for gi in groups if zero[gi]]
        pool = (idx, comps, per, texts)
        rounds = 0
        while len(kept) < want and rounds < self.g.dynamic_sampling_max_rounds:
            rounds += 1
            more_idx, more = self._sample_round(index, rounds, want - len(kept))
            more_per = self._score(more_idx, more)
            base = len(pool[0])
            pool = (pool[0] + more_idx, pool[1] + more, torch.cat([pool[2], more_per]), pool[3] + self._texts)
            zero = zero_std_groups(total(self.rewards, more_per), n).tolist()
            kept += [base + j for j in range(len(more_idx)) if not zero[j]]
            dropped += [base + j for j in range(len(more_idx)) if zero[j]]
        chosen = sorted(kept[:want] + dropped[:max(0, want - len(kept))])
        rows = [gi * n + j for gi in chosen for j in range(n)]
        info = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/filled": float(max(0, want - len(kept)))}
        return ([pool[0][gi] for gi in chosen], [pool[1][r] for r in rows], pool[2][rows], [pool[3][r] for r in rows],
                info)

    def rollout(self, index: int):
        t0 = time.perf_counter()
        idx, comps, per, texts, info = self.collect(index)
        t_gen = time.perf_counter() - t0
        n, B = self.g.num_generations, len(comps)
        rewards = total(self.rewards, per)
        adv = advantages(rewards, n, self.g.advantage, self.g.scale_rewards)
        truncated = torch.tensor([c.truncated for c in comps])
        keep = ~truncated if self.g.mask_truncated_completions else torch.ones(B, dtype=torch.bool)
        prompt_ids = [self.prompts[i].ids for i in idx for _ in range(n)]
        d, mb = self.denv, self.spec.train.micro_batch_size
        share = B // d.dp_size
        lo = d.dp_rank * share
        batches = [pack(prompt_ids[a:a + mb], comps[a:a + mb], adv[a:a + mb], keep[a:a + mb])
                   for a in range(lo, lo + share, mb)]
        t1 = time.perf_counter()
        self.trainer.method.annotate(self.trainer, batches)
        self.metrics = {**self._metrics(per, rewards, comps), **info, "time/generation_s": t_gen,
                        "time/logprobs_s": time.perf_counter() - t1}
        self.samples = [{"prompt": self.prompts[idx[j // n]].prompt, "completion": texts[j], "reward": float(rewards[j])}
                        for j in range(0, B, n)]
        return batches

    def _metrics(self, per: torch.Tensor, rewards: torch.Tensor, comps: List[Completion]) -> Dict[str, float]:
        """TRL 1.16 GRPOTrainer's names: reward, reward_std (mean of the groups' stds), rewards/<name>/mean|std,
        frac_reward_zero_std, completions/mean_length|min_length|max_length|clipped_ratio."""
        n = self.g.num_generations
        grouped = rewards.view(-1, n)
        out = {"reward": float(rewards.mean()), "reward_std": float(grouped.std(dim=1).mean()),
               "frac_reward_zero_std": float(zero_std_groups(rewards, n).double().mean())}
        for j, r in enumerate(self.rewards):
            out[f"rewards/{r.name}/mean"] = float(per[:, j].mean())
            out[f"rewards/{r.name}/std"] = float(per[:, j].std()) if per.shape[0] > 1 else 0.0
        lengths = torch.tensor([len(c.ids) for c in comps], dtype=torch.float64)
        out.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(sum(c.truncated for c in comps) / len(comps))})
        return out
