"""The run spec's sections of the training methods beyond sft: `pref` (xtune dpo) and `grpo` with its rewards
(xtune grpo). Frozen dataclasses like the rest of the spec; `schema.py` re-exports them, and their allowed enum
values are in `schema.CHOICES` with the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Rewards a `grpo.rewards` item may name with `builtin` (methods/grpo_rewards.py): the eval scorers and two shapes.
REWARD_BUILTINS = ("exact", "regex", "math", "format", "length")


@dataclass(frozen=True)
class PrefSpec:
    """Preference tuning (`xtune dpo`): the loss over (chosen, rejected) pairs and its reference."""

    # dpo: Rafailov et al. 2023 (arXiv:2305.18290); ipo: Azar et al. 2023 (arXiv:2310.12036), squared loss on the
    # log-ratio margin; simpo: Meng et al. 2024 (arXiv:2405.14734), length-normalised, no reference;
    # orpo: Hong et al. 2024 (arXiv:2403.07691), SFT loss + odds-ratio term, no reference.
    loss: str = "dpo"
    # Inverse temperature; null: the paper's value (dpo 0.1, ipo tau 0.1, simpo 2.0; orpo uses orpo_lambda).
    beta: Optional[float] = None
    # Conservative DPO (Mitchell 2023): the probability that a pair's labels are flipped; dpo and simpo only.
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (the paper's gamma / beta = 0.5 at beta 2.0).
    simpo_gamma: float = 1.0
    # ORPO's weight lambda of the odds-ratio term (the paper's 0.1).
    orpo_lambda: float = 0.1
    # Reference model: init (the starting weights; with adapters, the base with adapters disabled), none, or
    # auto (init for dpo and ipo, none for simpo and orpo).
    reference: str = "auto"


@dataclass(frozen=True)
class RewardSpec:
    """One reward of `xtune grpo`: a builtin or a user function, and its weight in the sum."""

    # Name in the metrics (rewards/<name>/mean); null: the builtin's name or the function's name.
    name: Optional[str] = None
    # A user function `module:function(prompts, completions, **fields) -> list[float]` (module under grpo.reward_path).
    fn: Optional[str] = None
    # A builtin reward: exact, regex, math (the eval scorers of the same names, against the record's `answer`),
    # format (1 when a regex matches the whole completion), length (a penalty per token over a budget).
    builtin: Optional[str] = None
    # Weight of this reward in the total.
    weight: float = 1.0
    # Keyword arguments of the builtin or the function (e.g. {pattern: ...} for format). (null, not {}: see
    # DatasetSpec.columns.)
    args: Optional[Dict[str, Any]] = None


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
    epsilon_high: Optional[float] = None
    # token: one ratio per token (GRPO); sequence: the geometric mean ratio of the completion (GSPO).
    importance_sampling_level: str = "token"
    # Completions cut at gen.max_new_tokens (no EOS) carry no loss.
    mask_truncated_completions: bool = False
    # Weight of the k3 KL estimate to the reference (0: no reference is held).
    beta: float = 0.0
    # Rewards summed with their weights (list of {name, fn, builtin, weight, args}).
    rewards: List[RewardSpec] = field(default_factory=list)
    # Folder put on the import path while the `fn` rewards' modules are imported.
    reward_path: Optional[str] = None
    # Prompts longer than this many tokens (rendered with the chat template) are left out, counted in the log.
    max_prompt_length: int = 512


def needs_reference(loss: str) -> bool:
    """Whether a preference loss compares the policy with a reference model (`pref.reference: auto` -> init)."""
    return loss in ("dpo", "ipo")
