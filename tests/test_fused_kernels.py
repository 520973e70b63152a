"""Fused RMSNorm / SiLU-and-mul / rotary / K/V store: Triton kernels vs. their PyTorch references.

Without a GPU the Triton kernels run through Triton's interpreter, whose fp32 -> bf16
conversion truncates instead of rounding: tolerances allow an ulp or two of the dtype.
"""

from __future__ import annotations

import pytest
import torch

from cubeserve.layers import fused_kernels as fk

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 2) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulps * eps, atol=ulps * eps)


def test_dispatch_uses_torch_on_cpu() -> None:
    x = torch.randn(3, 32)
    weight = torch.randn(32)
    assert torch.equal(fk.rms_norm(x, weight, 1e-6), fk.rms_norm_torch(x, weight, 1e-6))
    gate_up = torch.randn(3, 64)
    assert torch.equal(fk.silu_and_mul(gate_up), fk.silu_and_mul_torch(gate_up))
    cos, sin = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    k = torch.randn(3, 16)
    for got, expected in zip(
        fk.rotary_emb(x, k, cos, sin, 16), fk.rotary_emb_torch(x, k, cos, sin, 16), strict=True
    ):
        assert torch.equal(got, expected)


def test_torch_references_match_their_definitions() -> None:
    x, residual, weight = torch.randn(4, 16), torch.randn(4, 16), torch.rand(16) + 0.5
    normed, summed = fk.rms_norm_torch(x, weight, 1e-6, residual)
    assert torch.equal(summed, x + residual)
    rms = summed.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(normed, summed / rms * weight)

    gate_up = torch.randn(2, 10)
    expected = gate_up[:, :5] * torch.sigmoid(gate_up[:, :5]) * gate_up[:, 5:]
    torch.testing.assert_close(fk.silu_and_mul_torch(gate_up), expected)

    # A rotation keeps each (i, i + half) pair's norm and rotates by the given angle.
    angle = torch.rand(3, 1, 4)
    x = torch.randn(3, 2 * 8)
    rotated, _ = fk.rotary_emb_torch(x, x[:, :8], angle.cos(), angle.sin(), 8)
    rotated = rotated.view(3, 2, 8)
    original = x.view(3, 2, 8)
    norms = lambda t: t[..., :4].pow(2) + t[..., 4:].pow(2)
    torch.testing.assert_close(norms(rotated), norms(original))
    torch.testing.assert_close(
        rotated[..., 0],
        original[..., 0] * angle[:, :, 0].cos() - original[..., 4] * angle[:, :, 0].sin(),
    )


# ---- Triton kernels (compiled on CUDA, interpreted on CPU) ------------------------------


def _triton_unusable_reason() -> str | None:
    if not fk.HAS_TRITON:
        return "triton is not installed"
    if not ON_CUDA and type(fk._rms_norm_kernel).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 was set; no GPU to compile for"
    return None


needs_triton = pytest.mark.skipif(
    _triton_unusable_reason() is not None, reason=str(_triton_unusable_reason())
)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 3584] if ON_CUDA else [48, 130])
def test_rms_norm_kernel(dtype: torch.dtype, hidden: int) -> None:
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    weight = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    assert_within_ulps(fk.rms_norm_triton(x, weight, 1e-6), fk.rms_norm_torch(x, weight, 1e-6))

    normed, summed = fk.rms_norm_triton(x, weight, 1e-5, residual)
    expected_normed, expected_summed = fk.rms_norm_torch(x, weight, 1e-5, residual)
    assert_within_ulps(summed, expected_summed, ulps=1)
    assert_within_ulps(normed, expected_normed, ulps=3)


@needs_triton
def test_rms_norm_kernel_on_strided_rows() -> None:
    """Per-head q/k norms pass [tokens * heads, head_dim] rows of a wider tensor."""
    fused = torch.randn(5, 3 * 32, device=DEVICE)
    q = fused[:, :64]
    weight = torch.rand(32, device=DEVICE)
    rows = q.reshape(-1, 32)
    assert_within_ulps(
        fk.rms_norm_triton(rows, weight, 1e-6), fk.rms_norm_torch(rows, weight, 1e-6)
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 2 * 40), (2, 3, 2 * 18944 if ON_CUDA else 2 * 1100)])
def test_silu_and_mul_kernel(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gate_up = 3 * torch.randn(shape, dtype=dtype, device=DEVICE)
    # GPU exp differs from torch's in the last fp32 bit or two.
    assert_within_ulps(fk.silu_and_mul_triton(gate_up), fk.silu_and_mul_torch(gate_up), ulps=4)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,head_dim", [(3, 16), (28, 128)] if ON_CUDA else [(3, 16), (5, 24)]
)
def test_rotary_kernel(dtype: torch.dtype, num_heads: int, head_dim: int) -> None:
    num_tokens, num_kv_heads = 9, 1
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    fused = torch.randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=DEVICE)
    q, k, _ = fused.split([q_size, kv_size, kv_size], dim=-1)
    angles = torch.rand(num_tokens, head_dim // 2, device=DEVICE) * 100
    table = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)  # as RotaryEmbedding.forward returns them
    got = fk.rotary_emb_triton(q, k, cos, sin, head_dim)
    expected = fk.rotary_emb_torch(q, k, cos, sin, head_dim)
    for actual, reference in zip(got, expected, strict=True):
        assert_within_ulps(actual, reference, ulps=4)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_kernel_writes_only_the_given_slots(cache_dtype: torch.dtype) -> None:
    num_slots, num_kv_heads, head_dim = 12, 2, 24
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    # New K/V as the backends pass them: views of the fused qkv projection (row stride > row).
    qkv = torch.randn(3, 5 * num_kv_heads * head_dim, dtype=torch.bfloat16, device=DEVICE)
    k = qkv[:, 2 * 48 : 3 * 48].view(3, num_kv_heads, head_dim)
    v = qkv[:, 4 * 48 :].view(3, num_kv_heads, head_dim)
    slots = torch.tensor([7, 1, 10], device=DEVICE)
    fk.store_kv_triton(k_cache, v_cache, slots, k, v)
    fk.store_kv_torch(expected_k, expected_v, slots, k, v)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert torch.equal(k_cache[slots], k.to(cache_dtype))


def test_enable_torch_compile_routes_ops_through_compiled_references(monkeypatch) -> None:
    monkeypatch.setattr(fk, "_compiled", {})
    fk.enable_torch_compile()
    assert set(fk._compiled) == {"rms_norm", "silu_and_mul", "rotary_emb"}
    calls: list[int] = []
    compiled = fk._compiled["silu_and_mul"]
    fk._compiled["silu_and_mul"] = lambda x: calls.append(x.shape[0]) or compiled(x)
    for rows in (3, 7):  # dynamic shapes: one compilation serves both
        gate_up = torch.randn(rows, 2 * 48)
        torch.testing.assert_close(fk.silu_and_mul(gate_up), fk.silu_and_mul_torch(gate_up))
    assert calls == [3, 7]
