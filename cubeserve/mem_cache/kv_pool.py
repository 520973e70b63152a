"""Paged KV storage: a request -> token-slot table and per-layer K/V buffers.

Pages hold one token (SGLang's default ``page_size=1``), so the radix cache can share
prefixes at token granularity. Slot 0 is never handed out: dummy tokens (CUDA-graph padding,
the start-up warm-up) write their K/V there, and read through any request row they stay in
bounds, since every ``req_to_token`` entry is a valid slot (0 where unused).
"""

from __future__ import annotations

import torch

from cubeserve.layers.fused_kernels import store_kv
from cubeserve.utils import to_device

PADDING_SLOT = 0
PADDING_ROW = 0


class ReqToTokenPool:
    """Maps (request row, position) -> KV slot.

    The table lives on the device, where attention reads it, and is mirrored on the host, where
    the scheduler reads a request's slots to hand them to the radix cache: reading the device
    table would wait for every forward queued on the device.
    """

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._host_table = torch.zeros((size, max_context_len), dtype=torch.int64)
        self._free_rows = list(range(size))

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(
        self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set ``table[rows[i], positions[i]] = slots[i]`` (host int64 tensors); returns
        ``positions`` and ``slots`` on the device, which the forward needs as well."""
        self._host_table[rows, positions] = slots
        device = self.device
        on_device = to_device(positions, torch.int64, device), to_device(slots, torch.int64, device)
        self.req_to_token[to_device(rows, torch.int64, device), on_device[0]] = on_device[1]
        return on_device

    def write_prefix(self, row: int, slots: torch.Tensor) -> None:
        """Make ``slots`` (host) the first ``len(slots)`` entries of ``row``."""
        self._host_table[row, : len(slots)] = slots
        self.req_to_token[row, : len(slots)] = to_device(slots, torch.int64, self.device)

    def slots(self, row: int, end: int) -> torch.Tensor:
        """The host copy of ``row``'s first ``end`` slots."""
        return self._host_table[row, :end].clone()


class TokenSlotAllocator:
    """Free list of KV slots, kept on the CPU so allocation never syncs the device."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots  # usable slots, 1..num_slots
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64)
        self._num_free = num_slots

    def available_size(self) -> int:
        return self._num_free

    def used_size(self) -> int:
        return self.num_slots - self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self._num_free:
            return None
        start = self._num_free - n
        slots = self._free[start : self._num_free].clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = int(slots.numel())
        if n == 0:
            return
        slots = slots.to("cpu", torch.int64)
        if self._num_free + n > self.num_slots:
            raise RuntimeError("double free of KV slots")
        self._free[self._num_free : self._num_free + n] = slots
        self._num_free += n


class KVCache:
    """Per-layer K and V buffers of shape [num_slots + 1, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.dtype = dtype

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], slots, k, v)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
