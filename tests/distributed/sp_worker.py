"""Sequence parallelism (parallel.sp_size) against one rank, several cases in one launch.

Usage (1 rank, sp=1):    python sp_worker.py OUT_DIR
       (2 ranks, sp=2):  torchrun --nproc-per-node 2 sp_worker.py OUT_DIR
       (4 ranks, sp=2 x dp=2): torchrun --nproc-per-node 4 sp_worker.py OUT_DIR
Each case builds the real qwen3 adapter over OUT_DIR/init-<case> (written by the test), takes one step with
the gradients saved, then more steps; rank 0 writes OUT_DIR/sp<sp>-w<world>.pt: {case: results}.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.split_worker import full_grads
from tests.distributed.tiny import ListLoader, pack
from xtune.config.schema import LossSpec, ModelSpec, OptimSpec, ParallelSpec, PeftSpec, RunSpec, TrainSpec
from xtune.engine.distributed import init_distributed
from xtune.engine.trainer import Trainer
from xtune.models import get_adapter

STEPS = 5
ROWS = 2  # rows per global batch (1 micro-batch of 1 row per data-parallel rank and micro-step)

# name -> (parallel kwargs, loss reduction, peft)
CASES = {
    "sdpa_gqa": (dict(attn="sdpa"), "token", None),  # 4 heads, 1 KV head: KV repeated for sp=2
    "eager": (dict(attn="eager"), "sample", None),
    "ac_lora": (dict(attn="sdpa", activation_checkpointing=True), "token", PeftSpec(method="lora", r=4, alpha=8.0)),
}


def make_trainer(case, out_dir, sp, run_dir, resume=None):
    par_kw, reduction, peft = CASES[case]
    spec = RunSpec(model=ModelSpec(family="qwen3", load_from=str(Path(out_dir) / f"init-{case}")),
                   parallel=ParallelSpec(sp_size=sp, **par_kw), peft=peft or PeftSpec(),
                   loss=LossSpec(mode="chunk", chunk_size=7, reduction=reduction),
                   optim=OptimSpec(lr=1e-3, max_grad_norm=0.0),
                   train=TrainSpec(global_batch_size=ROWS, max_steps=STEPS, seed=1, resume=resume))
    denv = init_distributed(spec.parallel)
    loader = ListLoader(STEPS, ROWS, denv.dp_rank, denv.dp_size, ROWS // denv.dp_size, seed=11, docs_per_row=4)
    evals = [pack(row) for row in ListLoader(1, 2, 0, 1, 1, seed=99).rows_of_step(0)][denv.dp_rank::denv.dp_size]
    return Trainer(spec, run_dir, adapter=get_adapter(spec.model), tokenizer=None, loader=loader,
                   eval_batches=evals, denv=denv)


def run_case(case, out_dir, sp, tag):
    tr = make_trainer(case, out_dir, sp, Path(out_dir) / f"run-{case}-{tag}")
    res = {"eval0": tr.evaluate()}
    stats = tr.forward_backward(next(tr.loader))
    res["grads"] = full_grads(tr.model)
    tr.optimizer_step()
    tr.scheduler.step()
    tr.step += 1
    losses = [stats["loss"]]
    for _ in range(STEPS - 1):
        losses.append(tr.train_step(next(tr.loader))["loss"])
        if tr.step == 2 and case == "sdpa_gqa":
            ckpt = tr.save()
    res["losses"] = losses
    res["eval"] = tr.evaluate()
    if case == "sdpa_gqa":  # resume from step 2 under the same layout: steps 3.. exactly as uninterrupted
        tr2 = make_trainer(case, out_dir, sp, Path(out_dir) / f"resumed-{case}-{tag}", resume=str(ckpt))
        tr2.resume(ckpt)
        res["resumed"] = [tr2.train_step(next(tr2.loader))["loss"] for _ in range(STEPS - 2)]
    return tr.denv, res


def main():
    out_dir = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = 1 if world == 1 else 2
    results = {}
    for case in CASES:
        denv, results[case] = run_case(case, out_dir, sp, f"w{world}")
    if denv.is_main:
        torch.save(results, Path(out_dir) / f"sp{sp}-w{world}.pt")
    denv.barrier()
    denv.close()
    from xtune.engine.worker import _exit

    _exit(0)


if __name__ == "__main__":
    main()
