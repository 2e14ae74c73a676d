"""Sequence parallelism (parallel.sp_size) against one rank, several cases in one launch.

Usage (1 rank, sp=1):    python sp_worker.py OUT_DIR
       (2 ranks, sp=2):  torchrun --nproc-per-node 2 sp_worker.py OUT_DIR
       (4 ranks, sp=2 x dp=2): torchrun --nproc-per-node 4 sp_worker.py OUT_DIR
Each case builds its family's real adapter over OUT_DIR/init-<case> (written by the test), takes one step with
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
from xtune.engine.trainer import Trainer
from xtune.methods import get_method
from xtune.models import get_adapter
from xtune.parallel.distributed import init_distributed

STEPS = 5
ROWS = 2  # rows per global batch (1 micro-batch of 1 row per data-parallel rank and micro-step)

# name -> (parallel kwargs, loss reduction, peft)
CASES = {
    "sdpa_gqa": (dict(attn="sdpa"), "token", None),  # 4 heads, 1 KV head: KV repeated for sp=2
    "eager": (dict(attn="eager"), "sample", None),
    "ac_lora": (dict(attn="sdpa", activation_checkpointing=True), "token", PeftSpec(method="lora", r=4, alpha=8.0)),
    "vlm": (dict(attn="sdpa"), "token", None),  # intern_s1 (InternVL) tiny, rows with images
    "moe": (dict(attn="sdpa"), "token", None),  # qwen3_moe tiny: the router's load-balancing loss over the row
}
FAMILY = {"vlm": "intern_s1", "moe": "qwen3_moe"}  # the others: qwen3
MOE_COEF = 0.5  # model.router_aux_loss_coef of the moe case: large, so the aux term weighs in the gradients
IMAGE_TOKEN, TILE_TOKENS, TILE = 95, 4, 56  # the VLM case's config (test_sequence_parallel.save_vlm)


def vlm_row(seed):
    """(input_ids, labels, pixel_values) docs of one row: each doc has text, then one image of 1-2 tiles
    (4 image tokens each, untrained), then trained text; an image may straddle the middle of the row."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(3):
        tiles = int(torch.randint(1, 3, (1,), generator=g))
        pre, post = (int(x) for x in torch.randint(2, 9, (2,), generator=g))
        ids = torch.cat([torch.randint(0, 90, (pre,), generator=g), torch.full((tiles * TILE_TOKENS,), IMAGE_TOKEN),
                         torch.randint(0, 90, (post,), generator=g)]).tolist()
        labels = [ids[i + 1] if i + 1 >= len(ids) - post else -100 for i in range(len(ids) - 1)] + [-100]
        docs.append((ids, labels, torch.randn(tiles, 3, TILE, TILE, generator=g)))
    return docs


class VlmLoader(ListLoader):
    def rows_of_step(self, s):
        return [vlm_row(self.seed * 100003 + s * 101 + r) for r in range(self.rows)]

    def __next__(self):  # ListLoader's split of the step's rows, packed with their images
        if self.pos >= self.total_steps:
            raise StopIteration
        per_rank = self.rows // self.dp
        mine = self.rows_of_step(self.pos)[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.pos += 1
        m = per_rank // self.micro
        return [pack_vlm([d for row in mine[i * m:(i + 1) * m] for d in row]) for i in range(self.micro)]


def pack_vlm(docs):
    batch = pack([(ids, labels) for ids, labels, _ in docs])
    batch.pixel_values = torch.cat([px for _, _, px in docs])
    return batch


def make_trainer(case, out_dir, sp, run_dir, resume=None):
    par_kw, reduction, peft = CASES[case]
    coef = MOE_COEF if case == "moe" else None
    spec = RunSpec(model=ModelSpec(family=FAMILY.get(case, "qwen3"), load_from=str(Path(out_dir) / f"init-{case}"),
                                   router_aux_loss_coef=coef),
                   parallel=ParallelSpec(sp_size=sp, **par_kw), peft=peft or PeftSpec(),
                   loss=LossSpec(mode="chunk", chunk_size=7, reduction=reduction),
                   optim=OptimSpec(lr=1e-3, max_grad_norm=0.0),
                   train=TrainSpec(global_batch_size=ROWS, max_steps=STEPS, seed=1, resume=resume))
    denv = init_distributed(spec.parallel)
    loader_cls, pack_fn = (VlmLoader, pack_vlm) if case == "vlm" else (ListLoader, pack)
    loader = loader_cls(STEPS, ROWS, denv.dp_rank, denv.dp_size, ROWS // denv.dp_size, seed=11, docs_per_row=4)
    evals = [pack_fn(row) for row in loader_cls(1, 2, 0, 1, 1, seed=99).rows_of_step(0)][denv.dp_rank::denv.dp_size]
    return Trainer(spec, run_dir, method=get_method(spec), adapter=get_adapter(spec.model), tokenizer=None, loader=loader,
                   eval_batches=evals, denv=denv)


def run_case(case, out_dir, sp, tag):
    tr = make_trainer(case, out_dir, sp, Path(out_dir) / f"run-{case}-{tag}")
    res = {"eval0": tr.evaluate()}
    stats = tr.forward_backward(next(tr.loader))
    res["grads"] = full_grads(tr.model)
    tr.optimizer_step()
    tr.scheduler.step()
    tr.step += 1
    losses, aux = [stats["loss"]], [stats["aux_loss"]]
    for _ in range(STEPS - 1):
        rec = tr.train_step(next(tr.loader))
        losses.append(rec["loss"])
        aux.append(rec.get("aux_loss", 0.0))
        if tr.step == 2 and case == "sdpa_gqa":
            ckpt = tr.save()
    res["losses"], res["aux"] = losses, aux
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
    from xtune.launch.worker import _exit

    _exit(0)


if __name__ == "__main__":
    main()
