"""Run one global batch through the engine in several layouts; save loss and full gradients.

Usage (1 rank):  python split_worker.py INIT_DIR OUT_DIR
         (2 ranks): torchrun --nproc-per-node 2 split_worker.py INIT_DIR OUT_DIR
1 rank runs the layouts 1x4 (four micro-batches) and 1x1 (all rows packed into one micro-batch);
2 ranks run 2x2 with plain FSDP + activation checkpointing, and 2x2 as HSDP (replicate 2 x shard 1).
"""

import dataclasses as dc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.tiny import ListLoader, TinyAdapter, pack
from xtune.config.schema import LossSpec, ModelSpec, OptimSpec, ParallelSpec, PeftSpec, RunSpec, TrainSpec
from xtune.engine.trainer import Trainer
from xtune.methods import get_method
from xtune.parallel.distributed import init_distributed

REDUCTIONS = ("token", "sample", "square")


def full_grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:  # frozen (adapter runs): no gradient at all
            continue
        out[name.replace("_checkpoint_wrapped_module.", "")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return out


LORA = PeftSpec(method="lora", r=4, alpha=8.0)


def lora_layout(init_dir, out_dir, name, parallel, micro_of_rank):
    """One global batch through adapters on every linear layer; B is set to seeded non-zero values (the same on
    every rank and layout) so A gets a gradient too. Saves the loss, adapter gradients and adapter weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    spec = RunSpec(model=ModelSpec(load_from=init_dir), parallel=parallel, peft=LORA,
                   loss=LossSpec(mode="chunk", chunk_size=7), train=TrainSpec(global_batch_size=4, max_steps=1))
    denv = init_distributed(parallel)
    trainer = Trainer(spec, out_dir, method=get_method(spec), adapter=TinyAdapter(spec.model), tokenizer=None,
                      loader=ListLoader(1, 4, denv.rank, denv.world_size, 1), denv=denv)
    g = torch.Generator().manual_seed(17)
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    b = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sorted(full.items()) if ".lora_B." in k}
    set_model_state_dict(trainer.model, b, options=StateDictOptions(full_state_dict=True, strict=False))
    weights = {k: v.clone() for k, v in get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True)).items() if ".lora_" in k}
    rows = ListLoader(1, 4, 0, 1, 1, seed=5).rows_of_step(0)
    stats = trainer.forward_backward(micro_of_rank(rows, denv.rank))
    result = {"loss": stats["loss"], "grads": full_grads(trainer.model), "weights": weights}
    if denv.is_main:
        torch.save(result, Path(out_dir) / f"lora-{name}.pt")
    denv.barrier()
    return denv


def run_layout(init_dir, out_dir, name, parallel, micro_of_rank):
    spec = RunSpec(model=ModelSpec(load_from=init_dir), parallel=parallel,
                   loss=LossSpec(mode="chunk", chunk_size=7),
                   optim=OptimSpec(max_grad_norm=0.05), train=TrainSpec(global_batch_size=4, max_steps=1))
    denv = init_distributed(parallel)
    rows = ListLoader(1, 4, 0, 1, 1, seed=5).rows_of_step(0)
    trainer = Trainer(spec, out_dir, method=get_method(spec), adapter=TinyAdapter(spec.model), tokenizer=None,
                      loader=ListLoader(1, 4, denv.rank, denv.world_size, 1), denv=denv)
    result = {}
    for red in REDUCTIONS:
        trainer.spec = dc.replace(spec, loss=dc.replace(spec.loss, reduction=red))
        trainer.root.loss_spec = trainer.spec.loss
        stats = trainer.forward_backward(micro_of_rank(rows, denv.rank))
        result[red] = {"loss": stats["loss"], "grads": full_grads(trainer.model)}
        # Global grad norm over the DTensor shards, and clipping to optim.max_grad_norm (0.05).
        result[red]["norm"] = trainer.grad_norm()
        result[red]["clipped"] = full_grads(trainer.model)
        trainer.optimizer.zero_grad(set_to_none=True)
    if denv.is_main:
        torch.save(result, Path(out_dir) / f"{name}.pt")
    denv.barrier()
    return denv


def random_init_check(out_dir):
    """Random init on 2 ranks: FSDP shards differ from each other; HSDP replicas are identical."""
    from torch import nn

    from xtune.parallel.fsdp import build_sharded

    class Root(nn.Module):
        def __init__(self, m, _impl=None):
            super().__init__()
            self.model = m

    res = {}
    for name, par in [("fsdp", ParallelSpec()), ("hsdp", ParallelSpec(replicate_degree=2))]:
        denv = init_distributed(par)
        root, _, _ = build_sharded(TinyAdapter(ModelSpec()), RunSpec(parallel=par), denv, "sdpa", Root)
        local = root.model.model.embed_tokens.weight.to_local().contiguous()
        both = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(both, local)
        res[name] = torch.equal(both[0], both[1])
    if denv.is_main:
        torch.save(res, Path(out_dir) / "random_init.pt")


def random_init_state(out_dir, names_and_layouts):
    """The whole random-init state dict (seed 3) of each layout, for the test to compare across world sizes."""
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from xtune.parallel.fsdp import build_sharded

    class Root(nn.Module):
        def __init__(self, m, _impl=None):
            super().__init__()
            self.model = m

    for name, par in names_and_layouts:
        denv = init_distributed(par)
        spec = RunSpec(parallel=par, train=TrainSpec(seed=3))
        root, _, _ = build_sharded(TinyAdapter(ModelSpec()), spec, denv, "sdpa", Root)
        full = get_model_state_dict(root.model, options=StateDictOptions(full_state_dict=True))
        # Every rank runs the same attention (Ulysses under sp_size=2): rank 0's init must not change its model.
        attn = [None] * denv.world_size
        torch.distributed.all_gather_object(attn, root.model.config._attn_implementation)
        if denv.is_main:
            torch.save({"state": {k: v.clone() for k, v in full.items()}, "attn": attn}, Path(out_dir) / f"init-{name}.pt")
        denv.barrier()


class FreezingAdapter(TinyAdapter):
    def apply_freeze(self, model):
        model.model.embed_tokens.weight.requires_grad_(False)
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)


def freeze_check(init_dir, out_dir):
    """Frozen parameters under FSDP2 (sharing FSDP groups with trained ones): no grads, no Adam state,
    unchanged by a step; their neighbours train."""
    spec = RunSpec(model=ModelSpec(load_from=init_dir), loss=LossSpec(mode="chunk"),
                   train=TrainSpec(global_batch_size=2, max_steps=1))
    denv = init_distributed(spec.parallel)
    tr = Trainer(spec, out_dir, method=get_method(spec), adapter=FreezingAdapter(spec.model), tokenizer=None, denv=denv,
                 loader=ListLoader(1, 2, denv.rank, denv.world_size, 1))
    attn = tr.model.model.layers[0].self_attn
    named = {"embed": tr.model.model.embed_tokens.weight, "q": attn.q_proj.weight, "k": attn.k_proj.weight}
    before = {n: p.full_tensor().clone() for n, p in named.items()}
    tr.train_step(next(tr.loader))
    res = {n: {"changed": not torch.equal(before[n], p.full_tensor()), "state": p in tr.optimizer.state}
           for n, p in named.items()}
    if denv.is_main:
        torch.save(res, Path(out_dir) / "freeze.pt")


def main():
    init_dir, out_dir = sys.argv[1], sys.argv[2]
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        d = run_layout(init_dir, out_dir, "1x4", ParallelSpec(), lambda rows, r: [pack(row) for row in rows])
        run_layout(init_dir, out_dir, "1x1", ParallelSpec(), lambda rows, r: [pack([d for row in rows for d in row])])
        lora_layout(init_dir, out_dir, "1x4", ParallelSpec(), lambda rows, r: [pack(row) for row in rows])
        random_init_state(out_dir, [("1", ParallelSpec())])
    else:
        two = lambda rows, r: [pack(row) for row in rows[2 * r:2 * r + 2]]
        d = run_layout(init_dir, out_dir, "2x2", ParallelSpec(activation_checkpointing=True, ac_ratio=0.5), two)
        run_layout(init_dir, out_dir, "2x2-hsdp", ParallelSpec(replicate_degree=2), two)
        lora_layout(init_dir, out_dir, "2x2", ParallelSpec(activation_checkpointing=True), two)
        random_init_check(out_dir)
        random_init_state(out_dir, [("2-fsdp", ParallelSpec()), ("2-hsdp", ParallelSpec(replicate_degree=2)),
                                    ("2-sp", ParallelSpec(sp_size=2))])
        freeze_check(init_dir, out_dir)
    d.close()
    from xtune.launch.worker import _exit

    _exit(0)


if __name__ == "__main__":
    main()
