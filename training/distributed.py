"""Distributed set-up for `ace train` under torchrun: join the process group (NCCL on GPU, gloo
on CPU), and check at the end that every rank holds the same teacher."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ace_model.embedding import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(requested_device: str | None) -> DistInfo:
    """Join the torchrun process group when launched with WORLD_SIZE > 1; each rank uses the GPU of
    its LOCAL_RANK (ace_model.embedding.resolve_device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    return DistInfo(0, 1, local_rank, device, owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, also before/after the process group exists (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def gather(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (just [value] in a single process)."""
    if info.world_size == 1:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: nn.Module, teacher: nn.Module, info: DistInfo) -> list[str]:
    """Every rank's teacher hash after taking rank 0's buffers; raises if the teachers differ."""
    for buffer in model.buffers():  # BN running statistics drift apart without SyncBatchNorm
        dist.broadcast(buffer, src=0)
    hashes = gather(info, state_hash(teacher))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"distributed ranks diverged: teacher hashes {hashes}")
    return hashes
