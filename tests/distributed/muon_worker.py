"""torch.optim.Muon on an FSDP2-sharded matrix (DTensor Shard(0) on 2 ranks) against Muon on the same
matrix unsharded: Muon's Newton-Schulz orthogonalisation must see the full matrix, so the updates agree."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor


def main():
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    sharded = torch.nn.Linear(24, 16, bias=False)
    plain = torch.nn.Linear(24, 16, bias=False)
    plain.load_state_dict(sharded.state_dict())
    fully_shard(sharded, mesh=mesh)
    kw = dict(lr=0.1, weight_decay=0.1, nesterov=True, adjust_lr_fn="match_rms_adamw")
    opt, ref = torch.optim.Muon([sharded.weight], **kw), torch.optim.Muon([plain.weight], **kw)
    # A rank-0 shard-only update would differ: orthogonalising each half apart is not the full matrix's update.
    half = torch.optim.Muon([torch.nn.Parameter(plain.weight.detach()[:8].clone())], **kw)
    worst, half_diff = 0.0, 0.0
    for i in range(3):
        g = torch.randn(16, 24, generator=torch.Generator().manual_seed(i))
        sharded.weight.grad = distribute_tensor(g, mesh, sharded.weight.placements)
        plain.weight.grad = g
        half.param_groups[0]["params"][0].grad = g[:8].clone()
        opt.step()
        ref.step()
        half.step()
        worst = max(worst, (sharded.weight.full_tensor() - plain.weight).abs().max().item())
        half_diff = max(half_diff, (half.param_groups[0]["params"][0] - plain.weight[:8]).abs().max().item())
    if dist.get_rank() == 0:
        print(f"MUON max_diff={worst} shard_only_diff={half_diff}", flush=True)
    dist.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
