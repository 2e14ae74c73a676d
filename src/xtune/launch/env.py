"""The one reader of the launcher's environment: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, its run id, Slurm's SLURM_*.

Light on purpose (no torch): the config stage asks it for the world size, the CLI for the rank and the run id,
the engine for the process group to join.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    # "torchrun" (RANK and WORLD_SIZE set), "slurm" (srun with more than one task) or None (a plain process)
    launcher: str | None
    rank: int
    world_size: int
    local_rank: int
    # An id shared by all ranks of a multi-process external launch (None otherwise): they agree on one run dir.
    run_id: str | None
    # Slurm only: the job id (for a port) and the node list (for the master address).
    slurm_job_id: str | None = None
    slurm_nodelist: str | None = None
    slurm_launch_node: str | None = None

    @property
    def launched(self) -> bool:
        return self.launcher is not None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    slurm = {k: env.get(k) for k in ("SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR")}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher, rank, world, local = "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        launcher, rank, world = "slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        launcher, rank, world, local = None, 0, 1, 0
    run_id = None
    if world > 1:
        for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
            if env.get(var) and env[var] != "none":
                run_id = env[var]
                break
        else:
            run_id = env.get("MASTER_PORT", "run")
    return LaunchEnv(launcher, rank, world, local, run_id, slurm["SLURM_JOB_ID"], nodelist,
                     slurm["SLURM_LAUNCH_NODE_IPADDR"])
