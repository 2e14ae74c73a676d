"""The typed spec of `xtune grpo` (the `grpo` group): rollouts, advantages, the clipped policy loss, the rewards.

Kept beside schema.py (which imports it for RunSpec.grpo) so that module stays short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RewardSpec:
    """One reward of `xtune grpo`: a builtin or a user function, and its weight in the sum."""

    # Name in the metrics (rewards/<name>/mean); null: the builtin's name or the function's name.
    name: str | None = None
    # A user function `module:function(prompts, completions, **fields) -> list[float]` (module under grpo.reward_path).
    fn: str | None = None
    # A builtin reward: exact, regex, math (the eval scorers of the same names, against the record's `answer`),
    # format (1 when a regex matches the whole completion), length (a penalty per token over a budget).
    builtin: str | None = None
    # Weight of this reward in the total.
    weight: float = 1.0
    # Keyword arguments of the builtin or the function (e.g. {pattern: ...} for format). (null, not {}: see
    # DatasetSpec.columns.)
    args: dict[str, Any] | None = None


@dataclass(frozen=True)
class GrpoSpec:
    """Online RL (`xtune grpo`): rollouts, advantages, the clipped policy loss and its KL term."""

    # Completions sampled per prompt (a group); train.global_batch_size counts completions and is a multiple of it.
    num_generations: int = 8
    # Optimizer steps taken on each batch of rollouts (the importance ratio moves away from 1 after the first).
    num_iterations: int = 1
    # group: (r - mean of the group) / scale; rloo: r minus the mean of the other completions of its group.
    advantage: str = "group"
    # The advantage's divisor: the group's std (GRPO), the whole batch's std, or none (Dr. GRPO).
    scale_rewards: str = "group"
    # DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full.
    dynamic_sampling: bool = False
    # Most extra sampling rounds per step with dynamic_sampling; after them the batch is filled with dropped groups.
    dynamic_sampling_max_rounds: int = 4
    # grpo: token mean per completion, then mean over completions; dr_grpo: token sum / (completions x
    # gen.max_new_tokens); dapo: token mean over all completion tokens of the batch.
    loss: str = "dapo"
    # Lower clipping range of the importance ratio: [1 - epsilon, 1 + epsilon_high].
    epsilon: float = 0.2
    # Upper clipping range (DAPO's clip-higher, e.g. 0.28); null: epsilon.
    epsilon_high: float | None = None
    # token: one ratio per token (GRPO); sequence: the geometric mean ratio of the completion (GSPO).
    importance_sampling_level: str = "token"
    # Completions cut at gen.max_new_tokens (no EOS) carry no loss.
    mask_truncated_completions: bool = False
    # Weight of the k3 KL estimate to the reference (0: no reference is held).
    beta: float = 0.0
    # Rewards summed with their weights (list of {name, fn, builtin, weight, args}).
    rewards: list[RewardSpec] = field(default_factory=list)
    # Folder put on the import path while the `fn` rewards' modules are imported.
    reward_path: str | None = None
    # Prompts longer than this many tokens (rendered with the chat template) are left out, counted in the log.
    max_prompt_length: int = 512
