"""A training run of the tiny model through `xtune.methods.train`, started by torchrun in the tests.

--sleep slows each step so a test can kill the run mid-way; --sigterm-at K makes rank 1 (only) send
itself SIGTERM while step K runs, to test that all ranks stop together after that step.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.tiny import ListLoader, TinyAdapter
from xtune.config.schema import (
    LoggingSpec,
    LossSpec,
    ModelSpec,
    OptimSpec,
    ParallelSpec,
    RunSpec,
    SchedSpec,
    TrainSpec,
)
from xtune.methods import train


class SignallingLoader(ListLoader):
    def __init__(self, *a, sigterm_at=None, **kw):
        super().__init__(*a, **kw)
        self.sigterm_at = sigterm_at

    def __next__(self):
        out = super().__next__()
        if self.sigterm_at is not None and self.pos == self.sigterm_at and self.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--resume", default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--sigterm-at", type=int, default=None)
    p.add_argument("--optim", default="adamw")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--param-dtype", default="auto")
    p.add_argument("--nan-at-call", type=int, default=None, help="rank 0's forward call whose hidden states become NaN")
    a = p.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    spec = RunSpec(
        model=ModelSpec(load_from=a.init),
        loss=LossSpec(mode="chunk", chunk_size=16),
        optim=OptimSpec(name=a.optim, lr=a.lr, weight_decay=0.01, momentum=0.9, nesterov=a.optim != "adamw"),
        sched=SchedSpec(type="cosine", warmup_ratio=0.25, min_lr_ratio=0.1),
        parallel=ParallelSpec(nproc_per_node=world, param_dtype=a.param_dtype),
        train=TrainSpec(global_batch_size=4, max_steps=a.steps, save_every=a.save_every, keep_last=a.keep_last,
                        resume=a.resume),
        logging=LoggingSpec(tensorboard=False, progress="plain"),
    )
    loader = SignallingLoader(a.steps, 4, rank, world, 4 // world // 1, seed=11, sleep=a.sleep, cycle=2,
                              sigterm_at=a.sigterm_at)
    nan_at = [a.nan_at_call] if a.nan_at_call is not None and rank == 0 else []
    result = train(spec, a.run_dir, adapter=TinyAdapter(spec.model, nan_at_steps=nan_at), tokenizer=None, loader=loader)
    if rank == 0:
        print("RESULT", result, flush=True)
    from xtune.launch.worker import _exit

    _exit(0)  # as xtune's own worker does (see there)


if __name__ == "__main__":
    main()
