"""The background half of `train.async_save`: DCP's public async save (torch 2.13) on a process group of its own.

`start` copies this rank's state into host memory (on the caller's thread: the copy is what gets written, so
training may change the weights as soon as it returns) and hands the write to DCP's background thread;
`then` runs the rest of a save (hashing, marker, `latest`) on one more thread, after the write.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions


class AsyncWriter:
    def __init__(self, device: torch.device):
        # The background collectives (DCP's plan exchange, then the checksum gather and the agreement on errors)
        # run on a gloo group of their own, so they never interleave with the training's on the default group;
        # DCP's async save also needs a CPU backend for them (torch 2.13 asserts one). Collective: every rank.
        self.group = dist.new_group(backend="gloo")
        # One stager for the run: its host buffers are allocated at the first save and reused by the next ones
        # (pinned on CUDA for faster copies). They hold one copy of this rank's model and optimizer shards.
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=False))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="xtune-checkpoint")

    def start(self, state_dict: dict, folder: Path) -> Future:
        """Stage `state_dict` to host memory now; the Future completes when DCP has written it under `folder`."""
        return dcp.async_save(state_dict, checkpoint_id=str(folder), process_group=self.group,
                              async_stager=self._stager)

    def then(self, fn) -> Future:
        """Run `fn` in the background, after whatever was handed over before it."""
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stager.close()
