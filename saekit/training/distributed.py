"""Data parallelism under torchrun: process group set-up and the few collectives the trainer needs.

    torchrun --nproc_per_node 2 -m saekit.training CONFIG.yaml [--key value ...]

Every rank reads its own disjoint part of the store; gradients are averaged by DistributedDataParallel
during backward (so model hooks that edit gradients see the averaged ones); rank 0 writes checkpoints
and logs. Outside torchrun (no WORLD_SIZE > 1) everything here is a no-op on one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass
class RankView(Dist):
    """One rank of a latent-sharded run (``shard_latents``) seen as a job of its own: every rank holds
    the whole data path (world size 1: whole batches, rank 0's slots for data and RNG states, nothing
    all-reduced), while the model talks to the other ranks itself; only the real main rank writes."""

    main: bool = True

    @property
    def is_main(self) -> bool:
        return self.main


def setup(device: torch.device) -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, d: Dist) -> Tensor:
    if d.enabled:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: Tensor, d: Dist) -> Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (shapes must match)."""
    if not d.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_list(t: Tensor, d: Dist) -> list[Tensor]:
    if not d.enabled:
        return [t]
    parts = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(parts, t.contiguous())
    return parts


def gather_objects(obj, d: Dist) -> list:
    """Every rank's JSON-able object, in rank order (e.g. per-rank data-loader states)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
