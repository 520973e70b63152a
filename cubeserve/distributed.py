"""Tensor-parallel state. Layers ask here for their rank and group size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1


_tp = TPState()


def init_tensor_parallel(rank: int, size: int) -> None:
    global _tp
    _tp = TPState(rank, size)


def get_tp_rank() -> int:
    return _tp.rank


def get_tp_size() -> int:
    return _tp.size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp.size > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
