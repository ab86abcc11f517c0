"""Multi-process training on PyTorch's own engine (`torch.distributed`, started by `torchrun`).

A command started by torchrun finds RANK/WORLD_SIZE/LOCAL_RANK in its environment and joins the
process group once, where it starts (`start`): NCCL when its device is CUDA, gloo otherwise.
From then on every stage asks `current()` where it stands; the shared training loop wraps the
model in DistributedDataParallel and shards the batches, and only rank 0 prints or writes.
Everything that chooses (gates, lam, the decision) is computed on every rank from parameters
DDP keeps equal, and `same_on_all_ranks` asserts that it came out the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor

from abs_deploy.device import resolve_device
from abs_deploy.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float], device: str | torch.device = "cpu") -> list[float]:
        """Element-wise sum over ranks (accuracy counts, losses), through a tensor on `device`:
        NCCL reduces only CUDA tensors, so callers pass the device they train on."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def same_on_all_ranks(self, obj: object, what: str) -> None:
        """Raise when `obj` (JSON-able) differs between ranks: DDP keeps parameters equal, so
        anything computed from them alone must agree, and a rank that disagrees would train or
        write a different model."""
        if not self.active:
            return
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
        seen: list = [None] * self.world
        tdist.all_gather_object(seen, digest)
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: {seen}")

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Every floating buffer (BatchNorm's running statistics) averaged over ranks. DDP
        sends rank 0's buffers at the start of each forward, so after an epoch's last step
        each rank still holds the statistics of its own last batch: without this, the ranks
        would evaluate (and rank 0 would save) different models."""
        for b in module.buffers():
            if b.is_floating_point():
                mean_over_ranks(b)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


SINGLE = Dist()


def current() -> Dist:
    """Where this process stands now (SINGLE outside a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size())
    return SINGLE


def start(device_spec: str) -> tuple[Dist, str]:
    """Resolve `--device` and, when torchrun started this process, join the process group:
    each process takes the CUDA device of its local rank, and the backend follows the device
    (NCCL for CUDA, gloo for CPU), as torch.distributed requires."""
    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or current().active:
        return current(), device
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK are not: start multi-process "
                        "runs with torchrun") from None
    if torch.device(device).type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no CUDA device (this node has "
                            f"{torch.cuda.device_count()}): lower --nproc-per-node")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world), device


def stop() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def mean_over_ranks(t: Tensor) -> Tensor:
    """`t` averaged over ranks, in place (statistics a layer tracks from its own batch)."""
    d = current()
    if d.active:
        tdist.all_reduce(t)
        t.div_(d.world)
    return t
