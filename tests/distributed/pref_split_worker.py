"""One global batch of preference pairs through the engine in two layouts; save loss and full gradients.

Usage (1 rank):  python pref_split_worker.py INIT_DIR OUT_DIR      -> 1x4 (four micro-batches)
         (2 ranks): torchrun --nproc-per-node 2 pref_split_worker.py INIT_DIR OUT_DIR   -> 2x2 (FSDP2, gloo)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.split_worker import full_grads  # noqa: E402
from tests.distributed.tiny import ListLoader, TinyAdapter  # noqa: E402
from tests.unit.test_pref_losses import _packed, _pairs  # noqa: E402
from xtune.config.schema import (  # noqa: E402
    LossSpec,
    ModelSpec,
    ParallelSpec,  # noqa: E402
    PrefSpec,
    RunSpec,
    TrainSpec,
)
from xtune.engine.trainer import Trainer  # noqa: E402
from xtune.methods import get_method
from xtune.parallel.distributed import init_distributed  # noqa: E402

LOSSES = ("dpo", "simpo")


def rows():
    """4 rows of 2 pairs; pair ids 0..7 in order."""
    pairs = _pairs(seed=11, n=8)
    out = []
    for r in range(4):
        b = _packed(pairs[2 * r:2 * r + 2])
        b.pair_ids = torch.tensor([2 * r, 2 * r + 1])
        out.append(b)
    return pairs, out


def reference_table():
    return torch.linspace(-40.0, -20.0, 16, dtype=torch.float64).view(8, 2)  # fixed, not the policy's


def main(init_dir, out_dir):
    denv = init_distributed(ParallelSpec())
    _, batches = rows()
    result = {}
    for loss in LOSSES:
        spec = RunSpec(model=ModelSpec(load_from=init_dir), method="dpo", pref=PrefSpec(loss=loss),
                       loss=LossSpec(mode="chunk", chunk_size=5), train=TrainSpec(global_batch_size=4, max_steps=1))
        trainer = Trainer(spec, out_dir, method=get_method(spec), adapter=TinyAdapter(spec.model), tokenizer=None,
                          loader=ListLoader(1, 4, denv.rank, denv.world_size, 1), denv=denv)
        trainer.method.reference = {"train": reference_table()}
        mine = batches if denv.world_size == 1 else batches[2 * denv.rank:2 * denv.rank + 2]
        stats = trainer.forward_backward(mine)
        result[loss] = {"loss": stats["loss"], "grads": full_grads(trainer.model), "metrics": stats["method"]}
    if denv.is_main:
        torch.save(result, Path(out_dir) / f"{denv.world_size}.pt")
    denv.barrier()
    denv.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
