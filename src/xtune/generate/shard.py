"""Data-parallel generation under torchrun: each rank takes every world-th item, results are gathered in input order.

The default process group is used when one is initialised with more than one rank (`xtune eval` under torchrun,
or inside training); otherwise everything runs here. `all_gather_object` carries the results (plain Python
objects), so any backend works (gloo on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_count(n_items: int, batch_size: int) -> int:
    return -(-n_items // batch_size) if n_items else 0


def agreed_batches(mine: int, lockstep: bool) -> int:
    """The number of batches every rank runs: its own, or (lockstep: a sharded model, where every rank must take
    part in every forward) the most any rank has."""
    if not lockstep:
        return mine
    n = torch.tensor([mine], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        n = n.cuda()
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def sharded(items: Sequence[T], run: Callable[[list[T]], list[R]], enabled: bool = True) -> list[R]:
    """`run` on this rank's share of `items` (items k, k + world, ...), the results of all ranks in input order
    (`enabled=False`: all of them here)."""
    rank, world = rank_world()
    if world == 1 or not enabled:
        return run(list(items))
    idx = list(range(rank, len(items), world))
    mine = run([items[i] for i in idx])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, list(zip(idx, mine)))
    out: list = [None] * len(items)
    for part in gathered:
        for i, r in part:
            out[i] = r
    return out
