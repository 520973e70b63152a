"""Fused elementwise ops of the decoder layers: RMSNorm (+ residual add), SiLU-and-mul, rotary.

Each op has one public function that dispatches: a single hand-written Triton kernel on CUDA
tensors, the ``*_torch`` reference elsewhere, or, after ``enable_torch_compile()``
(``--enable-torch-compile``), the reference compiled by ``torch.compile`` on any device. Both round like the layers' PyTorch code
(normalise in float32, round, then scale by the weight; add the residual in the input dtype),
so switching implementations changes results only in the last bits of the output dtype.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None


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
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    heads = x.view(x.shape[0], -1, head_dim)
    x1, x2 = heads.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(x.shape)


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
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """Rotate-half (NeoX) rotary of ``x`` [num_tokens, num_heads * head_dim] by ``cos``/``sin``
    [num_tokens, 1, head_dim // 2] (``RotaryEmbedding.forward``'s output)."""
    impl = _compiled.get("rotary_emb") or (rotary_emb_triton if _use_triton(x) else rotary_emb_torch)
    return impl(x, cos, sin, head_dim)


def enable_torch_compile() -> None:
    """Route the three ops through ``torch.compile`` of their references (dynamic shapes, so
    one compilation serves every batch size; compiled lazily at the first call)."""
    references = {"rms_norm": rms_norm_torch, "silu_and_mul": silu_and_mul_torch,
                  "rotary_emb": rotary_emb_torch}
    _compiled.update({name: torch.compile(fn, dynamic=True) for name, fn in references.items()})


# ---- Triton ------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

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
    ):
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
    def _silu_and_mul_kernel(X, Out, stride_x, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * d + cols, (silu * up).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        X,
        Cos,
        Sin,
        Out,
        stride_x,
        stride_cos,
        stride_sin,
        num_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_HALF)
        mask_f = offs < HALF
        mask = (heads[:, None] < num_heads) & mask_f[None, :]
        cos = tl.load(Cos + token * stride_cos + offs, mask=mask_f, other=0.0).to(tl.float32)
        sin = tl.load(Sin + token * stride_sin + offs, mask=mask_f, other=0.0).to(tl.float32)
        first = heads[:, None] * (2 * HALF) + offs[None, :]
        x1 = tl.load(X + token * stride_x + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + token * stride_x + first + HALF, mask=mask, other=0.0).to(tl.float32)
        out = Out + token * num_heads * (2 * HALF) + first
        tl.store(out, (x1 * cos[None, :] - x2 * sin[None, :]).to(Out.dtype.element_ty), mask=mask)
        tl.store(
            out + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(Out.dtype.element_ty), mask=mask
        )


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
        x2d, out, x2d.stride(0), d, BLOCK=block, num_warps=_warps(block)
    )
    return out.view(*gate_up.shape[:-1], d)


def rotary_emb_triton(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    num_tokens = x.shape[0]
    num_heads = x.shape[1] // head_dim
    x = _rows(x)
    cos, sin = cos.reshape(num_tokens, -1), sin.reshape(num_tokens, -1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    block_h, block_half = triton.next_power_of_2(num_heads), triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        x,
        cos,
        sin,
        out,
        x.stride(0),
        cos.stride(0),
        sin.stride(0),
        num_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=_warps(block_h * block_half),
    )
    return out
