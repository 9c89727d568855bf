"""torchrun / DistributedDataParallel support: NCCL on GPU, gloo on CPU.

Under ``torchrun`` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; without it every
helper here is a no-op, so the same code runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """Wrap a network in DistributedDataParallel (identity in one process)."""
        if not self.enabled:
            return net
        if self.device_type == "cuda":
            return torch.nn.parallel.DistributedDataParallel(net, device_ids=[self.local_rank])
        return torch.nn.parallel.DistributedDataParallel(net)


def env_info() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any; a collective, so every rank calls it."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """``any_rank`` for several flags at once, in one collective."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [bool(flag) for flag in flags]
    value = torch.tensor([float(flag) for flag in flags], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistInfo]:
    """Initialise the process group under torchrun (and tear it down afterwards)."""
    info = env_info()
    if not info.enabled:
        yield info
        return
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    info.device_type = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield info
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
