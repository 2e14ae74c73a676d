"""The step source of `xtune grpo`: every `grpo.num_iterations` optimizer steps, a rollout.

A rollout takes `train.global_batch_size / grpo.num_generations` prompts from the seeded prompt stream, samples
`num_generations` completions of each on the live policy (each rank its share of the prompts; the results are
gathered so that every rank holds the whole batch), scores them, and turns the rewards into advantages over the
whole batch. With `grpo.dynamic_sampling` groups whose rewards are all equal are dropped and more prompts are
sampled, at most `dynamic_sampling_max_rounds` extra rounds; a batch still short after them is filled with dropped
groups. Each rank then trains its contiguous share of the completions, `train.micro_batch_size` completions per
packed micro-batch. Log-probs of the sampling policy are kept when `num_iterations` > 1 (later passes need the
ratio to it), and the reference's when `beta` > 0.

Sampling is seeded by (train.seed, rollout index, round) and the stream's position is the loader state in the
checkpoint, so a resumed run samples the same prompts with the same random stream.
"""

from __future__ import annotations

import math
import time

import torch

from xtune.config.schema import RunSpec
from xtune.data.prompts import PromptSet, PromptStream
from xtune.engine.step import derived_seed
from xtune.generate import Generator
from xtune.methods.grpo_advantages import advantages, zero_std_groups
from xtune.methods.grpo_rewards import Batch, build_rewards, score, total
from xtune.methods.grpo_sample import Completion, pack, sample


class Rollouts:
    def __init__(self, spec: RunSpec, prompts: PromptSet, denv):
        self.spec, self.prompts, self.denv = spec, prompts, denv
        self.g = spec.grpo
        self.num_prompts = spec.train.global_batch_size // self.g.num_generations
        self.stream = PromptStream(len(prompts), spec.train.seed)
        self.rewards = build_rewards(self.g)
        self.step = 0
        self.current = None
        self.metrics: dict[str, float] = {}
        self.samples: list[dict] = []
        self.trainer = None  # attached by GrpoMethod.prepare (the live model samples the completions)
        self.generator = None
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
        """k prompts from the stream and their completions, on every rank (prompt-major)."""
        idx = self.stream.take(k)
        if self.generator is None:
            tr = self.trainer
            self.generator = Generator(tr.root, tr.tokenizer, device=tr.device, template=self.spec.data.template,
                                       family=self.spec.model.family)
        seed = derived_seed(self.spec.train.seed, index, rnd) % (2 ** 31)
        comps = sample(self.generator, [self.prompts[i].prompt for i in idx], self.g.num_generations, self.spec.gen,
                       seed)
        return idx, comps

    def _score(self, idx: list[int], comps: list[Completion]) -> torch.Tensor:
        n = self.g.num_generations
        items = [self.prompts[i] for i in idx for _ in range(n)]
        keys = sorted({k for it in items for k in it.fields})
        batch = Batch([it.prompt for it in items], [c.text for c in comps], [len(c.ids) for c in comps],
                      {k: [it.fields.get(k) for it in items] for k in keys}, [it.source for it in items])
        return score(self.rewards, batch)

    def collect(self, index: int):
        """(prompt indices, completions, per-reward scores [B, R], dynamic sampling metrics)."""
        n, want = self.g.num_generations, self.num_prompts
        idx, comps = self._sample_round(index, 0, want)
        per = self._score(idx, comps)
        if not self.g.dynamic_sampling:
            return idx, comps, per, {}
        zero = zero_std_groups(total(self.rewards, per), n).tolist()
        kept = [gi for gi in range(len(idx)) if not zero[gi]]
        dropped = [gi for gi in range(len(idx)) if zero[gi]]
        rounds = 0
        while len(kept) < want and rounds < self.g.dynamic_sampling_max_rounds:
            rounds += 1
            more_idx, more = self._sample_round(index, rounds, want - len(kept))
            more_per = self._score(more_idx, more)
            zero = zero_std_groups(total(self.rewards, more_per), n).tolist()
            kept += [len(idx) + j for j in range(len(more_idx)) if not zero[j]]
            dropped += [len(idx) + j for j in range(len(more_idx)) if zero[j]]
            idx, comps, per = idx + more_idx, comps + more, torch.cat([per, more_per])
        short = max(0, want - len(kept))
        chosen = sorted(kept[:want] + dropped[:short])
        rows = [gi * n + j for gi in chosen for j in range(n)]
        info = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/filled": float(short)}
        return [idx[gi] for gi in chosen], [comps[r] for r in rows], per[rows], info

    def rollout(self, index: int):
        t0 = time.perf_counter()
        idx, comps, per, info = self.collect(index)
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
        self.samples = [{"prompt": self.prompts[idx[j // n]].prompt, "completion": comps[j].text, "reward": float(rewards[j])}
                        for j in range(0, B, n)]
        return batches

    def _metrics(self, per: torch.Tensor, rewards: torch.Tensor, comps: list[Completion]) -> dict[str, float]:
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
