"""Process group and device mesh: detect how we were launched, pick device and backend, build the mesh.

Every training run has a process group, even a single process (a 1-rank group over an in-memory
HashStore: no port, no rendezvous, milliseconds). One code path for 1 and N ranks means FSDP2,
DTensor gradients and distributed checkpoints behave identically everywhere.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xtune.errors import ConfigError
from xtune.launch.env import launch_env


def launched_env() -> dict | None:
    """Rank/world/local rank when started by torchrun or Slurm (srun), else None.

    Slurm's SLURM_* variables are mapped onto torch's env:// variables so `init_process_group`
    needs nothing else; MASTER_ADDR defaults to the first host of the job.
    """
    le = launch_env()
    if not le.launched:
        return None
    env = {"rank": le.rank, "world_size": le.world_size, "local_rank": le.local_rank}
    if le.launcher == "slurm":
        os.environ["RANK"] = str(le.rank)
        os.environ["WORLD_SIZE"] = str(le.world_size)
        os.environ["LOCAL_RANK"] = str(le.local_rank)
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr(le))
        # A port derived from the job id: concurrent jobs on a shared head node do not collide.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(le.slurm_job_id or "0") % 20000))
    return env


def _slurm_master_addr(le) -> str:
    if le.slurm_nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", le.slurm_nodelist], capture_output=True, text=True,
                                 timeout=10, check=False)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return le.slurm_launch_node or "127.0.0.1"


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: DeviceMesh
    owns_group: bool  # we created the process group, so we destroy it
    # Ulysses sequence parallelism: consecutive ranks [k*sp, (k+1)*sp) share one row (engine/ulysses.py).
    sp_size: int = 1
    sp_group: object = None  # this rank's SP process group (None when sp_size == 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        # Data-parallel groups: FSDP/HSDP shard the model over every rank, but the ranks of an SP group read
        # the same rows.
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum(self, values) -> torch.Tensor:
        """Sum a small list of floats over all ranks (float64, so counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.cpu()

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError(["parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU"])
    return requested


def init_distributed(parallel) -> DistEnv:
    """Initialise (or join an existing) process group and build the FSDP/HSDP mesh."""
    env = launched_env() or {"rank": 0, "world_size": 1, "local_rank": 0}
    device = pick_device(env["local_rank"])
    backend = pick_backend(parallel.backend, device)
    owns = False
    if not dist.is_initialized():
        # CPU offload on GPU moves sharded params to CPU, so collectives also need gloo for CPU tensors.
        pg_backend = "cuda:nccl,cpu:gloo" if backend == "nccl" else backend
        if env["world_size"] == 1 and launched_env() is None:
            dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(pg_backend, init_method="env://", rank=env["rank"], world_size=env["world_size"])
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    rep = parallel.replicate_degree
    if rep < 1 or world % rep:
        if owns:
            dist.destroy_process_group()
        raise ConfigError([f"parallel.replicate_degree={rep} must divide the world size {world}"])
    if rep > 1:
        mesh = init_device_mesh(device.type, (rep, world // rep), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    sp = getattr(parallel, "sp_size", 1)
    if sp < 1 or world % sp:
        if owns:
            dist.destroy_process_group()
        raise ConfigError([f"parallel.sp_size={sp} must divide the world size {world}"])
    sp_group = None
    if sp > 1:
        # Every rank creates every group (new_group is collective); each keeps its own.
        for start in range(0, world, sp):
            group = dist.new_group(list(range(start, start + sp)))
            if start <= rank < start + sp:
                sp_group = group
    return DistEnv(rank, world, env["local_rank"], device, backend, mesh, owns, sp, sp_group)
