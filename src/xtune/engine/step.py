"""One optimizer step of a trainer: the micro-batches' forward and backward with the loss normalised over the
whole global batch, the gradient norm and clipping, the optimizer step or the skip of a non-finite one, and
fp16's dynamic loss scaling."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from xtune.data.types import PackedBatch
from xtune.errors import XtuneError


def derived_seed(seed: int, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0])


def forward_backward(tr, micro_batches: list[PackedBatch]) -> dict:
    """Accumulate the gradients of the global-batch loss; returns global loss and counts.

    Each micro-batch contributes sum(w_i CE_i) / W with W summed over the whole global batch
    (one all_reduce before the micro-steps), so any split of the batch gives the same loss.
    FSDP averages gradients over all ranks; multiplying by world_size turns that into the sum. Under
    sequence parallelism each rank's loss covers its piece of the rows its SP group shares, so the sums over
    all ranks stay those of the global batch; the counts are taken once per SP group.
    """
    d = tr.denv
    once = 1 if d.sp_rank == 0 else 0
    local = [once * sum(tr.method.normaliser(mb) for mb in micro_batches),
             once * sum(mb.num_tokens for mb in micro_batches),
             once * sum(mb.num_trained for mb in micro_batches)]
    w_total, n_tokens, n_trained = d.all_reduce_sum(local).tolist()
    w_total = w_total if w_total > 0 else 1.0  # no trained token anywhere: zero loss, zero grads
    n_micro = len(micro_batches)
    # Accumulated on the device: no host sync per micro-batch, one all_reduce per step.
    acc = torch.zeros(2 + len(tr.method.stat_names), dtype=torch.float64, device=tr.device)
    first = d.dp_rank * n_micro  # this rank's first micro-batch in the global batch
    for j, mb in enumerate(micro_batches):
        # Randomness (dropout) is a function of (seed, step, micro-batch): nothing to checkpoint, and
        # the same on any number of ranks that splits the global batch into the same micro-batches.
        torch.manual_seed(derived_seed(tr.spec.train.seed, tr.step, first + j))
        loss_sum, aux, stats = tr.method.forward(tr.root, mb.to(tr.device))
        if stats is not None:
            acc[2:] += stats.detach().double()
        loss = loss_sum.float() / w_total
        objective = loss * d.world_size
        if aux is not None:
            # aux is a per-micro-batch mean: average it over micro-batches (and, via FSDP, ranks).
            objective = objective + aux.float() / n_micro
            acc[1] += aux.detach().double()
        (tr.scaler.scale(objective) if tr.scaler is not None else objective).backward()
        acc[0] += loss.detach().double()
    acc = acc.to(d.comm_device)
    torch.distributed.all_reduce(acc)
    loss, aux_sum, *stats = acc.tolist()
    return {"loss": loss, "aux_loss": aux_sum / (n_micro * d.world_size), "tokens": int(n_tokens),
            "trained_tokens": int(n_trained), "method": tr.method.metrics(stats, w_total)}


def grad_norm(tr) -> float:
    """Clip to optim.max_grad_norm (<= 0: no clipping) and return the global norm before clipping.

    With FSDP2 the gradients are DTensor shards; clip_grad_norm_ reduces their norms across the
    mesh and returns a (replicated) DTensor.
    """
    max_norm = tr.spec.optim.max_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(tr.params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def optimizer_step(tr) -> tuple:
    if tr.scaler is not None:
        return scaled_optimizer_step(tr)
    gnorm = grad_norm(tr)
    skipped = not math.isfinite(gnorm)
    if skipped:
        # Never let inf/nan reach the weights or Adam's moments: drop this step's gradients.
        tr.skipped_steps += 1
        tr.bad_streak += 1
        _too_many_bad_steps(tr)
    else:
        tr.optimizer.step()
        tr.bad_streak = 0
    tr.optimizer.zero_grad(set_to_none=True)
    return gnorm, skipped


def _too_many_bad_steps(tr) -> None:
    if tr.bad_streak >= tr.spec.train.max_bad_steps:
        raise XtuneError(
            f"{tr.bad_streak} steps in a row had a non-finite gradient norm (last at step {tr.step + 1}); "
            "stopping. Lower optim.lr, check the data, or resume from an earlier checkpoint "
            f"(train.max_bad_steps={tr.spec.train.max_bad_steps})")


def scaled_optimizer_step(tr) -> tuple:
    """fp16: unscale (all ranks agree on inf/nan), clip, step unless it overflowed, update the scale.

    An overflow is the scaler's normal way of finding its scale: it is skipped and counted
    (overflow_steps) but only counts towards train.max_bad_steps once the scale has fallen below 1,
    where the gradients themselves are non-finite."""
    tr.scaler.unscale_(tr.optimizer)
    gnorm = grad_norm(tr)
    skipped = not math.isfinite(gnorm)
    tr.step_scale = float(tr.scaler.get_scale())
    # Our own step rather than scaler.step: that one hands found_inf to fused AdamW, whose CPU kernel
    # rejects its shape (torch 2.13); unscale_ already recorded found_inf for update().
    if not skipped:
        tr.optimizer.step()
    tr.scaler.update()
    if skipped:
        tr.skipped_steps += 1
        tr.overflow_steps += 1
        tr.bad_streak = tr.bad_streak + 1 if tr.step_scale < 1.0 else 0
        _too_many_bad_steps(tr)
    else:
        tr.bad_streak = 0
    tr.optimizer.zero_grad(set_to_none=True)
    return gnorm, skipped


def make_scaler(denv):
    """torch's ShardedGradScaler: works on FSDP2's DTensor gradient shards and all-reduces the inf/nan flag
    over the default group, so every rank skips the same steps."""
    return ShardedGradScaler(device=denv.device.type)
