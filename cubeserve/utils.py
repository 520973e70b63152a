"""Small helpers shared across the engine."""

from __future__ import annotations

import torch


def to_device(
    values: list | torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Host data as a tensor on ``device``, without making the host wait for the device.

    A copy from pageable memory synchronizes the CUDA stream, so the host would stall behind
    every queued kernel (and the overlap scheduler would lose its overlap); a pinned staging
    buffer lets the copy queue up like a kernel. The caching host allocator keeps the buffer
    alive until the copy has run.
    """
    on_cpu = device.type == "cpu"
    if isinstance(values, torch.Tensor):
        host = values.to(dtype) if on_cpu else values.to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=not on_cpu)
    return host if on_cpu else host.to(device, non_blocking=True)
