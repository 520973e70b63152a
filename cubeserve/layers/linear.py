"""Tensor-parallel linear layers (Megatron layout, SGLang/vLLM loader convention).

Column-parallel layers split the output features across ranks, row-parallel layers split the
input features and all-reduce their partial sums. Each parameter carries a ``weight_loader``
that copies this rank's slice of a full checkpoint tensor; fused layers take a ``shard_id``
naming which checkpoint tensor (q/k/v, gate/up) is being loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from cubeserve.distributed import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from cubeserve.layers.gemv import linear, linear_silu_and_mul
from cubeserve.models.weights import default_weight_loader, new_parameter


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with the output features of ``W`` and ``b`` split across TP ranks."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size = input_size
        self.output_size_per_rank = divide(output_size, self.tp_size)
        self.gather_output = gather_output
        self.weight = new_parameter(
            self.output_size_per_rank, input_size, weight_loader=self.weight_loader
        )
        self.bias = (
            new_parameter(self.output_size_per_rank, weight_loader=self.weight_loader)
            if bias
            else None
        )

    def shard_layout(self, shard_id: int | str | None) -> tuple[int, int, int]:
        """(offset in this rank's parameter, rows, offset in the checkpoint tensor) along dim 0."""
        return 0, self.output_size_per_rank, self.tp_rank * self.output_size_per_rank

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        param_offset, rows, loaded_offset = self.shard_layout(shard_id)
        default_weight_loader(
            param.data.narrow(0, param_offset, rows), loaded.narrow(0, loaded_offset, rows)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        return tp_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate_up).

    ``shard_id`` is the index of the projection in ``output_sizes``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def shard_layout(self, shard_id: int | str | None) -> tuple[int, int, int]:
        rows_per_shard = [divide(size, self.tp_size) for size in self.output_sizes]
        rows = rows_per_shard[shard_id]
        return sum(rows_per_shard[:shard_id]), rows, self.tp_rank * rows


class GateUpParallelLinear(MergedColumnParallelLinear):
    """The fused [gate | up] projection of a gated MLP, returning ``silu(gate) * up``."""

    def __init__(self, input_size: int, intermediate_size: int, bias: bool = True) -> None:
        super().__init__(input_size, [intermediate_size, intermediate_size], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_silu_and_mul(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by attention head; ``shard_id`` is "q", "k" or "v".

    When there are fewer KV heads than ranks, each KV head is replicated on
    ``tp_size // total_num_kv_heads`` consecutive ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = True,
    ) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_dim
        super().__init__(hidden_size, output_size, bias)

    def shard_layout(self, shard_id: int | str | None) -> tuple[int, int, int]:
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        kv_rank = self.tp_rank // self.kv_head_replicas
        layouts = {
            "q": (0, q_rows, self.tp_rank * q_rows),
            "k": (q_rows, kv_rows, kv_rank * kv_rows),
            "v": (q_rows + kv_rows, kv_rows, kv_rank * kv_rows),
        }
        return layouts[shard_id]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return q, k, v


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with the input features of ``W`` split across TP ranks.

    The input is expected already split (the output of a column-parallel layer); partial
    results are all-reduced and the bias is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_rank = divide(input_size, self.tp_size)
        self.output_size = output_size
        self.weight = new_parameter(
            output_size, self.input_size_per_rank, weight_loader=self.weight_loader
        )
        self.bias = new_parameter(output_size, weight_loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param is self.weight:
            cols = self.input_size_per_rank
            loaded = loaded.narrow(1, self.tp_rank * cols, cols)
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
