"""The linear layers' matmul, with a Triton GEMV for a single token on CUDA.

Decoding one request multiplies one activation row by every weight matrix: the step is bound by
reading the weights once. On an H100, cuBLAS streams the Qwen2.5-7B matrices at 1.8-2.9 TB/s for
one row. The kernel below loads a program's first weight tile before the K loop, and before
waiting for the kernel that produces its input (it is launched with programmatic dependent
launch, ``cubeserve.layers.launch``). A bs-1 decode step of that model in its CUDA graph takes
5.53 ms with the tile loaded inside the loop, 5.26 ms loaded ahead, 5.19-5.28 ms with PDL too;
its matmuls take 4.77 ms of GPU time here and took 5.24 ms with cuBLAS. A variant taking
several rows gained little at two and lost to cuBLAS from four on, so ``linear`` sends only
single-row inputs here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cubeserve.layers import fused_kernels
from cubeserve.layers.launch import HAS_TRITON, supports_pdl

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


def linear_silu_and_mul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``silu_and_mul(linear(x, weight, bias))`` for a ``[gate | up]`` weight. For a single row
    the GEMV applies the activation in its epilogue: one kernel instead of two, and the down
    projection's GEMV then follows this one directly."""
    if _use_gemv(x, weight):
        return gemv_triton(x, weight, bias, silu_and_mul=True)
    return fused_kernels.silu_and_mul(F.linear(x, weight, bias))


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

    from cubeserve.layers.launch import allow_dependents, wait_for_previous

    @triton.jit
    def _load_tile(W_ptrs, k, K, cols, EVEN_K: tl.constexpr):
        """Columns ``k .. k + BLOCK_K`` of the program's weight rows."""
        if EVEN_K:
            return tl.load(W_ptrs + k, eviction_policy="evict_first")
        in_k = k + cols < K
        return tl.load(W_ptrs + k, mask=in_k[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _dot_tile(acc, w, X, k, K, cols, EVEN_K: tl.constexpr):
        if EVEN_K:
            x = tl.load(X + k + cols)
        else:
            x = tl.load(X + k + cols, mask=k + cols < K, other=0.0)
        return acc + tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)

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
        SILU_AND_MUL: tl.constexpr,
        PDL: tl.constexpr,
    ):
        allow_dependents(PDL)
        if SILU_AND_MUL:  # BLOCK_N == 2: gate row i and up row i
            rows = tl.program_id(0) + tl.arange(0, BLOCK_N) * (N // 2)
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # The last program's surplus rows re-read row N - 1, so W loads need no mask; only the
        # store is masked.
        loaded_rows = tl.minimum(rows, N - 1)
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = W + loaded_rows.to(tl.int64)[:, None] * K + cols[None, :]
        # Weights are never written by other kernels: the first tile is loaded while the
        # kernel producing X may still be running.
        w = _load_tile(w_ptrs, 0, K, cols, EVEN_K)
        wait_for_previous(PDL)
        acc = _dot_tile(tl.zeros((BLOCK_N,), dtype=tl.float32), w, X, 0, K, cols, EVEN_K)
        for k in range(BLOCK_K, K, BLOCK_K):
            w = _load_tile(w_ptrs, k, K, cols, EVEN_K)
            acc = _dot_tile(acc, w, X, k, K, cols, EVEN_K)
        if HAS_BIAS:
            acc += tl.load(Bias + loaded_rows).to(tl.float32)
        if SILU_AND_MUL:
            _store_silu_and_mul(Out + tl.program_id(0), acc)
        else:
            tl.store(Out + rows, acc.to(Out.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _store_silu_and_mul(out_ptr, gate_up):
        """``silu(gate) * up`` of ``gate_up`` = [gate, up], rounded where ``silu_and_mul`` of
        the stored projection rounds: after the projection, after the SiLU, after the product."""
        dtype = out_ptr.dtype.element_ty
        gate_up = gate_up.to(dtype).to(tl.float32)
        is_gate = tl.arange(0, 2) == 0
        gate = tl.sum(tl.where(is_gate, gate_up, 0.0))
        up = tl.sum(tl.where(is_gate, 0.0, gate_up))
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr, (silu * up).to(dtype))


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_and_mul: bool = False
) -> torch.Tensor:
    """``x`` [1, K] @ ``weight`` [N, K].T (+ ``bias`` [N]), accumulated in float32; with
    ``silu_and_mul``, ``silu(gate) * up`` of that [gate | up] result: [1, N // 2]."""
    n, k = weight.shape
    x = x.contiguous()
    out_features = n // 2 if silu_and_mul else n
    out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k))
    pdl = supports_pdl(x)
    grid = (out_features,) if silu_and_mul else (triton.cdiv(n, BLOCK_N),)
    _gemv_kernel[grid](
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
        SILU_AND_MUL=silu_and_mul,
        num_warps=NUM_WARPS,
        num_stages=1,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out
