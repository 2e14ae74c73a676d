"""Sampling completions from the live policy for `xtune grpo` (the generation engine), and packing them into rows.

`sample` is the one place the method generates: `xtune.generate.Generator` on the training root itself (its
`live.inference` context: eval mode, standard attention, FSDP2 root parameters gathered for the call and every
rank in lockstep), with the `gen` group's settings and `n = grpo.num_generations`, nothing written to disk. A vLLM
backend replaces this function alone: the method needs (token ids, text, truncated) per completion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from xtune.data.types import IGNORE_INDEX, PackedBatch


@dataclass
class Completion:
    ids: list[int]  # the sampled tokens through the first stop id or stop string (or all max_new_tokens of them)
    truncated: bool  # cut by max_new_tokens
    text: str = ""  # decoded, without special tokens, cut before a stop string


def sample(generator, prompts: Sequence[object], n: int, gen, seed: int) -> list[Completion]:
    """n completions of each prompt (prompt-major), seeded by `seed` (the generator forks the RNG: training's random
    stream is untouched). Under torchrun each rank samples its share of the prompts; all get every completion."""
    settings = dataclasses.replace(gen, n=n, seed=seed)
    out = generator.generate(list(prompts), settings)
    return [Completion(list(c.token_ids), c.finish_reason == "length", c.text) for group in out for c in group]


@dataclass
class RolloutBatch(PackedBatch):
    """A packed micro-batch of completions (one document each: prompt + completion, the completion trained) with
    what the loss reads per completion and per trained token."""

    advantages: torch.Tensor | None = None  # [D] float32
    keep: torch.Tensor | None = None  # [D] bool: False for masked truncated completions
    old_logp: torch.Tensor | None = None  # [N] float32, the sampling policy's (None: the first pass)
    ref_logp: torch.Tensor | None = None  # [N] float32, the reference's (beta > 0)

    def to(self, device) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device, non_blocking=True)
        return RolloutBatch(**moved)


def pack(prompts: Sequence[list[int]], completions: Sequence[Completion], advantages: torch.Tensor,
         keep: torch.Tensor) -> RolloutBatch:
    """One [1, T] row of documents prompt + completion; labels train the completion tokens (shifted as in Sample)."""
    ids, labels, pos, cu, trained = [], [], [], [0], []
    for p, c in zip(prompts, completions):
        doc = list(p) + list(c.ids)
        lab = [IGNORE_INDEX] * (len(p) - 1) + list(c.ids) + [IGNORE_INDEX]
        ids += doc
        labels += lab
        pos += list(range(len(doc)))
        cu.append(cu[-1] + len(doc))
        trained.append(len(c.ids))
    return RolloutBatch(
        input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), position_ids=torch.tensor([pos]),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(b - a for a, b in zip(cu[:-1], cu[1:])),
        doc_trained_tokens=torch.tensor(trained), advantages=advantages.float(), keep=keep.bool())
