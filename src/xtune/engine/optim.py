"""AdamW and the learning-rate schedule (warmup, then cosine / linear / constant down to a floor)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from xtune.errors import XtuneError


def build_optimizer(params: Iterable[torch.nn.Parameter], optim, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen ones get no state).

    Weight decay applies to matrices (ndim >= 2) and not to norms and biases, the usual practice.
    `impl=auto` picks the fused kernel (CUDA and CPU both have one; on a 2-core CPU it is ~7x faster
    than foreach for 80M parameters: one pass over memory instead of one per elementwise op).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise XtuneError("every parameter is frozen (model.freeze_*): nothing to train")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    impl = optim.impl
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    if impl == "for":
        kwargs = {"foreach": False}
    elif impl == "fused":
        kwargs = {"fused": True}
    else:
        kwargs = {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kwargs)


def lr_factor(sched, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR for 0-based step `s` (the LR used by optimizer step s).

    Warmup rises linearly to 1 at the last warmup step; the decay then reaches exactly
    `min_lr_ratio` on the last step of the run.
    """
    total = max(1, int(total_steps))
    warmup = min(total, math.ceil(sched.warmup_ratio * total)) if sched.warmup_ratio > 0 else 0
    floor = sched.min_lr_ratio
    decay_steps = max(1, total - warmup - 1)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if sched.type == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / decay_steps)
        if sched.type == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, sched, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, total_steps))
