"""Sampling completions from the live policy for `xtune grpo`, and packing them into training rows.

`sample_completions` is the one place the method generates: transformers' own `generate` (sampling with the
`gen` group's temperature / top_p / top_k / repetition penalty, KV cache, left-padded batches) on the training
model itself, in eval mode, nothing written to disk. Under FSDP2 the root's parameters are gathered for the call
(`unshard`) and every rank runs all `gen.max_new_tokens` decode steps (the blocks' all-gathers must match across
ranks), cutting each completion at its first stop token afterwards. A vLLM or continuous-batching backend
replaces this function alone: the method only needs (token ids, truncated) per completion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch
from transformers import GenerationConfig

from xtune.data.types import IGNORE_INDEX, PackedBatch


@dataclass
class Completion:
    ids: List[int]  # the sampled tokens up to and including the first stop token (or max_new_tokens of them)
    truncated: bool  # no stop token within max_new_tokens


def stop_ids(tokenizer, model) -> List[int]:
    """The tokenizer's EOS and the model's generation_config eos ids."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return sorted(int(i) for i in ids)


@torch.no_grad()
def sample_completions(root, model, tokenizer, prompts: Sequence[List[int]], n: int, gen, seed: int,
                       device, sync_steps: bool) -> List[Completion]:
    """n completions of each prompt (prompt-major: the n of prompt 0 first)."""
    if not prompts:
        return []
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    was_training = model.training
    model.eval()
    unshard = hasattr(root, "unshard")
    if unshard:
        root.unshard()
    # Exactly the gen group's settings (not the model folder's generation_config defaults). Without a stop id
    # every row runs all max_new_tokens steps: the same draws as with one, cut at the first stop below.
    config = GenerationConfig(do_sample=True, num_return_sequences=n, temperature=gen.temperature, top_p=gen.top_p,
                              top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                              max_new_tokens=gen.max_new_tokens, eos_token_id=None if sync_steps else stops,
                              pad_token_id=pad, use_cache=True)
    torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        if unshard:
            root.reshard()
        model.train(was_training)
    return [_cut(row[width:].tolist(), set(stops)) for row in out.cpu()]


def _cut(tokens: List[int], stops: set) -> Completion:
    for i, t in enumerate(tokens):
        if t in stops:
            return Completion(tokens[:i + 1], False)
    return Completion(tokens, True)


@dataclass
class RolloutBatch(PackedBatch):
    """A packed micro-batch of completions (one document each: prompt + completion, the completion trained) with
    what the loss reads per completion and per trained token."""

    advantages: Optional[torch.Tensor] = None  # [D] float32
    keep: Optional[torch.Tensor] = None  # [D] bool: False for masked truncated completions
    old_logp: Optional[torch.Tensor] = None  # [N] float32, the sampling policy's (None: the first pass)
    ref_logp: Optional[torch.Tensor] = None  # [N] float32, the reference's (beta > 0)

    def to(self, device) -> "RolloutBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device, non_blocking=True)
        return RolloutBatch(**moved)


def pack(prompts: Sequence[List[int]], completions: Sequence[Completion], advantages: torch.Tensor,
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
