"""QLoRA's base loaded on 2 ranks (FSDP2 over gloo, activation checkpointing): each rank saves its 4-bit bases.

Usage: torchrun --nproc-per-node 2 qlora_load_worker.py INIT_DIR OUT_DIR   ->  OUT_DIR/rank{0,1}.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.tiny import TinyAdapter
from xtune.config.schema import ModelSpec, ParallelSpec, PeftSpec, RunSpec
from xtune.parallel.distributed import init_distributed
from xtune.parallel.fsdp import build_sharded
from xtune.peft.quant import is_nf4

PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def main():
    init_dir, out_dir = sys.argv[1], sys.argv[2]
    spec = RunSpec(model=ModelSpec(load_from=init_dir), parallel=ParallelSpec(activation_checkpointing=True),
                   peft=PeftSpec(method="lora", r=4, alpha=8.0, quantize="nf4"))
    denv = init_distributed(spec.parallel)
    root, _, _ = build_sharded(TinyAdapter(spec.model), spec, denv, "sdpa", lambda m, _impl: m)
    bases = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in root.named_parameters() if is_nf4(p)}
    out = {n: {"shape": tuple(p.shape), **{part: getattr(p, part) for part in PARTS}} for n, p in bases.items()}
    torch.save(out, Path(out_dir) / f"rank{denv.rank}.pt")
    denv.close()


if __name__ == "__main__":
    main()
