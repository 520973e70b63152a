"""Fused elementwise ops of the decoder layers: RMSNorm (+ residual add), SiLU-and-mul, rotary
of q and k, and the store of new K/V into the paged cache.

Each op has one public function that dispatches: a single hand-written Triton kernel on CUDA
tensors, the ``*_torch`` reference elsewhere, or, after ``enable_torch_compile()``
(``--enable-torch-compile``), the reference compiled by ``torch.compile`` on any device (all
but the K/V store, a scatter that compiling would not shorten). Both round like the layers'
PyTorch code (normalise in float32, round, then scale by the weight; add the residual in the
input dtype), so switching implementations changes results only in the last bits of the output
dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cubeserve.layers.launch import HAS_TRITON, supports_pdl


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


# Op name -> torch.compile'd reference, once ``enable_torch_compile`` ran (in this process).
_compiled: dict[str, Callable] = {}


# ---- PyTorch references ------------------------------------------------------------------


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_emb_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate_half(q, cos, sin, head_dim), _rotate_half(k, cos, sin, head_dim)


def _rotate_half(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    heads = x.view(x.shape[0], -1, head_dim)
    x1, x2 = heads.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(x.shape)


def store_kv_torch(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    k_cache[slots] = k.to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)


# ---- dispatch ----------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
    impl = _compiled.get("rms_norm") or (rms_norm_triton if _use_triton(x) else rms_norm_torch)
    return impl(x, weight, eps, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a ``[..., 2 * d]`` tensor laid out ``[gate | up]``."""
    impl = _compiled.get("silu_and_mul") or (
        silu_and_mul_triton if _use_triton(gate_up) else silu_and_mul_torch
    )
    return impl(gate_up)


def rotary_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX) rotary of ``q`` and ``k`` [num_tokens, heads * head_dim] by
    ``cos``/``sin`` [num_tokens, 1, head_dim // 2] (``RotaryEmbedding.forward``'s output)."""
    impl = _compiled.get("rotary_emb") or (
        rotary_emb_triton if _use_triton(q) else rotary_emb_torch
    )
    return impl(q, k, cos, sin, head_dim)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """``k_cache[slots] = k`` and ``v_cache[slots] = v`` (caches [slots, kv_heads, head_dim],
    new K/V [num_tokens, kv_heads, head_dim]), cast to the cache dtype."""
    (store_kv_triton if _use_triton(k) else store_kv_torch)(k_cache, v_cache, slots, k, v)


def enable_torch_compile() -> None:
    """Route norm, SiLU-and-mul and rotary through ``torch.compile`` of their references
    (dynamic shapes, so one compilation serves every batch size; compiled lazily at the first
    call)."""
    references = {
        "rms_norm": rms_norm_torch,
        "silu_and_mul": silu_and_mul_torch,
        "rotary_emb": rotary_emb_torch,
    }
    _compiled.update({name: torch.compile(fn, dynamic=True) for name, fn in references.items()})


# ---- Triton ------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cubeserve.layers.launch import allow_dependents

    @triton.jit
    def _rms_norm_kernel(
        X,
        Residual,
        Weight,
        Out,
        Residual_Out,
        stride_x,
        stride_r,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        allow_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(Residual_Out + row * n_cols + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
        normed = (x32 * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(Weight + cols, mask=mask).to(tl.float32)
        tl.store(Out + row * n_cols + cols, (w * normed).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Out, stride_x, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
        allow_dependents(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * d + cols, (silu * up).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(
        X,
        Out,
        x_row,
        out_row,
        cos,
        sin,
        num_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < num_heads) & (offs < HALF)[None, :]
        first = heads[:, None] * (2 * HALF) + offs[None, :]
        x1 = tl.load(X + x_row + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_row + first + HALF, mask=mask, other=0.0).to(tl.float32)
        out = Out + out_row + first
        tl.store(out, (x1 * cos[None, :] - x2 * sin[None, :]).to(Out.dtype.element_ty), mask=mask)
        tl.store(
            out + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(Out.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _rotary_kernel(
        Q,
        K,
        Cos,
        Sin,
        OutQ,
        OutK,
        stride_q,
        stride_k,
        stride_cos,
        stride_sin,
        num_q_heads,
        num_k_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (token, 0) rotates the token's q heads, (token, 1) its k heads."""
        allow_dependents(PDL)
        token = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_HALF)
        cos = tl.load(Cos + token * stride_cos + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        sin = tl.load(Sin + token * stride_sin + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        if tl.program_id(1) == 0:
            _rotate_heads(
                Q,
                OutQ,
                token * stride_q,
                token * num_q_heads * (2 * HALF),
                cos,
                sin,
                num_q_heads,
                HALF,
                BLOCK_H,
                BLOCK_HALF,
            )
        else:
            _rotate_heads(
                K,
                OutK,
                token * stride_k,
                token * num_k_heads * (2 * HALF),
                cos,
                sin,
                num_k_heads,
                HALF,
                BLOCK_H,
                BLOCK_HALF,
            )

    @triton.jit
    def _store_kv_kernel(
        KCache,
        VCache,
        Slots,
        K,
        V,
        stride_k,
        stride_v,
        row_size,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        allow_dependents(PDL)
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(Slots + token).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < row_size
        k = tl.load(K + token * stride_k + cols, mask=mask)
        v = tl.load(V + token * stride_v + cols, mask=mask)
        tl.store(KCache + slot * row_size + cols, k.to(KCache.dtype.element_ty), mask=mask)
        tl.store(VCache + slot * row_size + cols, v.to(VCache.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D [rows, last dim] tensor whose last dim is contiguous."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    x2d = _rows(x)
    out = torch.empty(x2d.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual2d = x2d if residual is None else _rows(residual)
    residual_out = torch.empty_like(x2d) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2d.shape[0],)](
        x2d,
        residual2d,
        weight,
        out,
        residual_out,
        x2d.stride(0),
        residual2d.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_warps(block),
        PDL=supports_pdl(x),
    )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), residual_out.view(x.shape)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    d = gate_up.shape[-1] // 2
    x2d = _rows(gate_up)
    out = torch.empty((x2d.shape[0], d), dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(x2d.shape[0], triton.cdiv(d, block))](
        x2d, out, x2d.stride(0), d, BLOCK=block, num_warps=_warps(block), PDL=supports_pdl(x2d)
    )
    return out.view(*gate_up.shape[:-1], d)


def rotary_emb_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = q.shape[0]
    q, k = _rows(q), _rows(k)
    cos, sin = cos.reshape(num_tokens, -1), sin.reshape(num_tokens, -1)
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_q_heads, num_k_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    half = head_dim // 2
    block_h = triton.next_power_of_2(max(num_q_heads, num_k_heads))
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens, 2)](
        q,
        k,
        cos,
        sin,
        out_q,
        out_k,
        q.stride(0),
        k.stride(0),
        cos.stride(0),
        sin.stride(0),
        num_q_heads,
        num_k_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=_warps(block_h * block_half),
        PDL=supports_pdl(q),
    )
    return out_q, out_k


def store_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    row_size = k_cache[0].numel()
    k, v = k.reshape(-1, row_size), v.reshape(-1, row_size)
    if k.shape[0] == 0:
        return
    block = triton.next_power_of_2(row_size)
    _store_kv_kernel[(k.shape[0],)](
        k_cache,
        v_cache,
        slots,
        k,
        v,
        k.stride(0),
        v.stride(0),
        row_size,
        BLOCK=block,
        num_warps=_warps(block),
        PDL=supports_pdl(k),
    )
