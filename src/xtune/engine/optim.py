"""Optimizers (AdamW, SGD, Muon + AdamW, bitsandbytes' 8-bit AdamW) and the learning-rate schedule
(warmup, then cosine / linear / constant down to a floor)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from xtune.config.validate import BNB_SHARDED_REASON
from xtune.errors import XtuneError


def _is_muon_matrix(name: str, p: torch.nn.Parameter, io_ids: set) -> bool:
    """Muon takes the 2-D weight matrices of the hidden layers; embeddings and the output head (2-D but not
    hidden transforms), norms, biases and fused 3-D expert tensors stay with AdamW, as Muon's authors prescribe."""
    return p.ndim == 2 and id(p) not in io_ids and "embed" not in name and "lm_head" not in name


def io_param_ids(model: torch.nn.Module) -> set:
    """ids of the input-embedding and output-head weights (Muon leaves them to AdamW)."""
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            mod = getattr(model, get)()
        except (AttributeError, NotImplementedError):
            mod = None
        if mod is not None and getattr(mod, "weight", None) is not None:
            ids.add(id(mod.weight))
    return ids


def _adamw(groups, optim, device) -> torch.optim.AdamW:
    impl = optim.impl
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    kwargs = {"for": {"foreach": False}, "fused": {"fused": True}}.get(impl, {"foreach": True})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kwargs)


def _decay_groups(named: list) -> list:
    """Weight decay on matrices (ndim >= 2), not on norms and biases, the usual practice."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [g for g in ({"params": decay, "decay": True}, {"params": no_decay, "decay": False}) if g["params"]]


def build_optimizer(named_params: Iterable, optim, device: torch.device, io_ids: set = frozenset()) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only (frozen ones get no state).

    `named_params`: (name, parameter) pairs (or bare parameters, named by position). `io_ids`: ids of the
    embedding / output-head weights (`io_param_ids`), which Muon leaves to AdamW.
    adamw: `impl=auto` picks the fused kernel (CUDA and CPU both have one; one pass over memory instead of one
    per elementwise op: bench/README.md has the measured ratio).
    """
    named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(named_params)]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise XtuneError("every parameter is frozen (model.freeze_*): nothing to train")

    def with_wd(groups):
        return [{"params": g["params"], "weight_decay": optim.weight_decay if g["decay"] else 0.0} for g in groups]

    if optim.name == "adamw":
        return _adamw(with_wd(_decay_groups(named)), optim, device)
    if optim.name == "sgd":
        return torch.optim.SGD(with_wd(_decay_groups(named)), lr=optim.lr, momentum=optim.momentum,
                               nesterov=optim.nesterov and optim.momentum > 0, foreach=True)
    if optim.name == "adamw_8bit":
        return _adamw_8bit(with_wd(_decay_groups(named)), optim)
    if optim.name == "muon":
        return MuonWithAdamW(named, optim, device, io_ids)
    raise XtuneError(f"optim.name={optim.name}: unknown optimizer (adamw, sgd, muon, adamw_8bit)")


def _adamw_8bit(groups, optim) -> torch.optim.Optimizer:
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        raise XtuneError(BNB_SHARDED_REASON)
    try:
        import bitsandbytes as bnb  # lazy: optional extra (xtune[bnb])
    except ImportError:
        raise XtuneError("optim.name=adamw_8bit needs bitsandbytes: pip install 'xtune[bnb]'") from None
    # bitsandbytes keeps tensors under min_8bit_size (4096) elements in 32-bit state; its CPU path runs.
    return bnb.optim.AdamW8bit(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the hidden 2-D matrices, AdamW on everything else, as ONE optimizer: one LR
    schedule, one state dict for DCP (both inner optimizers share this object's `state` and group dicts).

    Muon's groups use `adjust_lr_fn="match_rms_adamw"` (Moonshot's scaling: the update's RMS matches AdamW's),
    so one `optim.lr` suits both parts. Under FSDP2 the matrices are DTensor shards along dim 0; Muon's
    Newton-Schulz iteration (norm, matmuls) runs on them as DTensor ops, which compute on the FULL matrix
    (DTensor redistributes the operands): the update equals the unsharded one (tests/distributed/muon_worker.py).
    """

    def __init__(self, named: list, optim, device: torch.device, io_ids: set):
        muon_named = [(n, p) for n, p in named if _is_muon_matrix(n, p, io_ids)]
        rest = [(n, p) for n, p in named if not _is_muon_matrix(n, p, io_ids)]
        self.muon_names = [n for n, _ in muon_named]
        self.adamw_names = [n for n, _ in rest]
        self.inner = []
        if muon_named:
            self.inner.append(torch.optim.Muon([p for _, p in muon_named], lr=optim.lr,
                                               weight_decay=optim.weight_decay, momentum=optim.momentum,
                                               nesterov=optim.nesterov, adjust_lr_fn="match_rms_adamw"))
        if rest:
            wd = [{"params": g["params"], "weight_decay": optim.weight_decay if g["decay"] else 0.0}
                  for g in _decay_groups(rest)]
            self.inner.append(_adamw(wd, optim, device))
        groups = [g for opt in self.inner for g in opt.param_groups]
        super().__init__(groups, {})  # keeps the very group dicts (add_param_group appends them)
        self._link()

    def _link(self) -> None:
        i = 0
        for opt in self.inner:
            n = len(opt.param_groups)
            opt.param_groups = self.param_groups[i:i + n]
            opt.state = self.state
            i += n

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state: point the inner ones at them
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.inner:
            opt.step()
        return loss


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


def build_scheduler(optimizer: torch.optim.Optimizer, sched, total_steps: int,
                    last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule over `total_steps`. `last_step` >= 0 continues a run whose step `last_step` is done: the
    groups' LRs are set for the next step, from each group's `initial_lr` (the peak)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched, total_steps), last_epoch=last_step)
