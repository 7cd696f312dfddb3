"""torch.distributed as torchrun starts it: one process per GPU (nccl) or N CPU processes (gloo).

`torchrun --nproc_per_node N script.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK in every process; `init`
reads them, joins the process group and gives each rank its device (accelerator index LOCAL_RANK when the
requested device is an accelerator, the CPU otherwise). Without torchrun (or with one process) `init`
returns a world of one and every helper below is a no-op, so a plain `python script.py` never touches
torch.distributed. The backend follows the device: torch's default for its type (nccl for CUDA, gloo for
the CPU). Nothing here assumes a GPU.

Used by scripts/sample_many.py (ldm/cli/sample_many.py: batches sharded over ranks) and by the training
loop (ldm/train/loop.py: DistributedDataParallel over a global batch split by rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # `init` created the process group (and `finish` destroys it)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes shared files (checkpoints, logs, manifests) and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of n (consecutive equal blocks, rank 0 first)."""
        if n % self.size:
            raise ValueError(f"a batch of {n} does not split evenly over {self.size} processes")
        per_rank = n // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One accelerator per rank: an accelerator device without an index becomes index `local_rank`."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, local_rank)
    return device


def init(device: torch.device | str | None = None) -> World:
    """Join the process group torchrun describes (a world of one without it). `device`: what the user asked
    for (None: this rank's accelerator if there is one, else the CPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:  # torch.device(<int>) is the CUDA device with that index: no device-name literal
        device = torch.device(local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = rank_device(device, local_rank)
    if not launched():
        return World(device=device)
    if device.type != "cpu":
        torch.get_device_module(device).set_device(device)
    owns = not dist.is_initialized()  # a caller may have joined already (then it also leaves)
    if owns:
        backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
        dist.init_process_group(backend, device_id=device if device.type != "cpu" else None)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def finish(world: World) -> None:
    """Leave the process group `init` joined (after the last collective)."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 on the backend's device)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(world: World, obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
