"""Data-parallel helpers: torchrun's environment -> a process group (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device) -> World:
    """Joins the torchrun job if there is one (no-op otherwise)."""
    if not launched_by_torchrun():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, local, True)


def barrier(world: World) -> None:
    if world.initialized:
        dist.barrier()


def finish(world: World) -> None:
    if world.initialized and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(value: float, world: World, device: torch.device) -> float:
    """The mean of a float over the ranks."""
    if not world.initialized:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world.size
