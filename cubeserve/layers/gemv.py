"""The linear layers' matmul, with a Triton GEMV for a single token on CUDA.

Decoding one request multiplies one activation row by every weight matrix: the step is bound by
reading the weights once. On an H100, cuBLAS streams the Qwen2.5-7B matrices at 1.8-2.9 TB/s for
one row. The kernel below takes 5.04 ms for all matrices of a token inside the bs-1 CUDA graph,
where cuBLAS took 5.24 ms (isolated, 2.1 TB/s on q/k/v up to 3.15 TB/s on the LM head). A
variant taking several rows gained little at two and lost to cuBLAS from four on, so ``linear``
sends only single-row inputs here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cubeserve.layers.fused_kernels import HAS_TRITON

# Rows of W per program and the K step: a program streams 2 rows x 1024 columns per iteration,
# 8 bf16 values per thread and load. In a sweep over 1-32 rows, 256-1024 columns, 2-8 warps,
# 1-3 stages and split-K 1-4 on the H100 it was within 1% of the best for the o, gate/up, down
# and LM-head matrices (q/k/v's best, 8 rows x 512 columns, was 1% faster than 2 x 1024 with
# 2 warps).
BLOCK_N = 2
MAX_BLOCK_K = 1024
NUM_WARPS = 4
GEMV_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a single row of a 16-bit dtype on CUDA uses the GEMV."""
    if _use_gemv(x, weight):
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def _use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        HAS_TRITON
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in GEMV_DTYPES
        and weight.dtype == x.dtype
        and weight.is_contiguous()
    )


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(
        X,
        W,
        Bias,
        Out,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # The last program's surplus rows re-read row N - 1, so W loads need no mask; only the
        # store is masked.
        loaded_rows = tl.minimum(rows, N - 1)
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = W + loaded_rows.to(tl.int64)[:, None] * K + cols[None, :]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs + k, eviction_policy="evict_first")
                x = tl.load(X + k + cols)
            else:
                in_k = k + cols < K
                w = tl.load(
                    w_ptrs + k, mask=in_k[None, :], other=0.0, eviction_policy="evict_first"
                )
                x = tl.load(X + k + cols, mask=in_k, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(Bias + loaded_rows).to(tl.float32)
        tl.store(Out + rows, acc.to(Out.dtype.element_ty), mask=rows < N)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [1, K] @ ``weight`` [N, K].T (+ ``bias`` [N]), accumulated in float32."""
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        n,
        k,
        HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
        num_stages=1,
    )
    return out
