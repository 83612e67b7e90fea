"""One process per device: set up from torchrun's or SLURM's environment, or run alone.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under SLURM (srun or
submitit, one task per GPU) the same facts come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
and the first host of the job's node list (`SLURM_JOB_NODELIST=gpu[07-08]` -> gpu07).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from submitit.slurm.slurm import SlurmJobEnvironment

from sparse_detr.config import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def slurm_master_address() -> str:
    """The first host of the job: SLURM_JOB_NODELIST in SLURM's compressed syntax
    (`node[1-2]`, `a[01-03,7],b1`) expanded by submitit's parser, the one its own job
    environment uses; no `scontrol` call, so it works wherever the job's environment is set."""
    return SlurmJobEnvironment().hostnames[0]


def environment_ranks(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun first, then SLURM, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is visible; use device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistributedContext:
    """Join the process group when the environment describes several processes."""
    rank, world_size, local_rank = environment_ranks()
    device = choose_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = slurm_master_address()
            os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistributedContext(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
