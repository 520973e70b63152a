"""How cubeserve's Triton kernels are launched: whether Triton is present, and programmatic
dependent launch (PDL) of the single-row GEMV.

On Hopper and newer GPUs a kernel launched with PDL can be scheduled while the kernel before it
still runs, once every program of that kernel has executed ``griddepcontrol.launch_dependents``
(or exited). Its programs then do what does not depend on that kernel and block in
``griddepcontrol.wait`` until it has finished and its writes are visible. In a bs-1 decode step
each GEMV follows a norm, the attention kernel or another GEMV: launched with PDL and loading
its first weight tile before it waits, it starts streaming weights during that kernel's tail.
Captured into a CUDA graph, the launches become programmatic edges.

Measured on an H100 (Qwen2.5-7B shape, bs-1 step in the CUDA graph): 5.28 ms with plain
launches, 5.22 ms with the GEMV launched with PDL, 5.39 ms with every kernel of the step
launched with PDL. So only the GEMV is; the other Triton kernels only call
``allow_dependents``. A kernel launched with PDL must call ``wait_for_previous`` before it reads anything an earlier
kernel wrote and before it exits, which keeps every later kernel ordered after it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Switched off to compare against plain launches (tests, benchmarks); results are identical.
pdl_enabled = True


def supports_pdl(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device use PDL (CUDA compute capability 9 or newer): the value
    of their ``PDL`` constexpr, and the GEMV's ``launch_pdl``."""
    return pdl_enabled and x.is_cuda and _capability_major(x.device) >= 9


@functools.cache
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def allow_dependents(PDL: tl.constexpr):
        """Let a next kernel launched with PDL be scheduled (no-op unless ``PDL``)."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible."""
        if PDL:
            gdc_wait()
