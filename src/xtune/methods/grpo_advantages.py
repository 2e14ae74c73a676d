"""Advantages of a batch of rollouts from their rewards (pure functions on tensors).

The rewards of a batch are [B] with the `G = grpo.num_generations` completions of one prompt next to each other
(a group is `rewards.view(-1, G)[k]`).

  group (GRPO, Shao et al. 2024, arXiv:2402.03300): A_i = (r_i - mean(group)) / scale
  rloo  (Ahmadian et al. 2024, arXiv:2402.14740):    A_i = r_i - mean(the other G - 1 of the group)
                                                        = G / (G - 1) (r_i - mean(group)), then / scale
  scale (grpo.scale_rewards): group -> the group's std, batch -> the std of all B rewards, none -> 1 (Dr. GRPO,
  Liu et al. 2025, arXiv:2503.20783). Stds are unbiased (n - 1); EPS keeps a constant group finite (its
  advantages are 0 whatever the scale).

A group whose rewards are all equal carries no signal: `zero_std_groups` finds them (DAPO's dynamic sampling,
Yu et al. 2025, arXiv:2503.14476, drops them; `frac_reward_zero_std` reports their share).
"""

from __future__ import annotations

import torch

EPS = 1e-4


def grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [B] with B a multiple of num_generations={num_generations}, "
                         f"got {tuple(rewards.shape)}")
    return rewards.view(-1, num_generations)


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[B / G] bool: the groups whose rewards are all equal."""
    g = grouped(rewards, num_generations)
    return (g == g[:, :1]).all(dim=1)


def advantages(rewards: torch.Tensor, num_generations: int, advantage: str = "group",
               scale_rewards: str = "group") -> torch.Tensor:
    """[B] fp32 advantages of [B] rewards (see the module's docstring)."""
    r = rewards.double()
    g = grouped(r, num_generations)
    centred = g - g.mean(dim=1, keepdim=True)
    if advantage == "rloo":
        centred = centred * (num_generations / (num_generations - 1))
    elif advantage != "group":
        raise ValueError(f"unknown advantage {advantage!r}")
    if scale_rewards == "group":
        scale = g.std(dim=1, keepdim=True)
    elif scale_rewards == "batch":
        scale = r.std().expand(g.shape[0], 1) if r.numel() > 1 else r.new_zeros(g.shape[0], 1)
    elif scale_rewards == "none":
        scale = None
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    if scale is not None:
        centred = centred / (scale + EPS)
    return centred.reshape(-1).float()
