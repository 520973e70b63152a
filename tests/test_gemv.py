"""The single-row Triton GEMV behind ``layers.gemv.linear`` against a float64 reference.

Without a GPU the kernel runs through Triton's interpreter, whose fp32 -> 16-bit conversion
truncates instead of rounding: the tolerance allows two ulps of the output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cubeserve.layers import fused_kernels, gemv
from cubeserve.layers.launch import HAS_TRITON

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype and actual.shape == expected.shape
    ulp = torch.finfo(dtype).eps * expected.abs().clamp(min=1.0)
    assert torch.all((actual.double() - expected).abs() <= 2 * ulp)


def test_linear_is_f_linear_off_cuda_and_for_several_rows() -> None:
    weight, bias = torch.randn(12, 40, dtype=torch.bfloat16), torch.randn(12, dtype=torch.bfloat16)
    for rows in (1, 3):
        x = torch.randn(rows, 40, dtype=torch.bfloat16)
        assert torch.equal(gemv.linear(x, weight, bias), F.linear(x, weight, bias))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k"),
    [
        (5, 64),  # odd N: the last program stores one of its two rows
        (33, 1100),  # K past one 1024-column step and not a multiple of it
        (8, 2048),  # K a multiple of the step: unmasked loads
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_kernel(dtype: torch.dtype, n: int, k: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(n, k, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(n, generator=generator).to(DEVICE, dtype) if with_bias else None
    out = gemv.gemv_triton(x, weight, bias)
    assert_within_ulps(out, reference(x, weight, bias), dtype)


@needs_triton
def test_gemv_kernel_reads_a_row_inside_a_larger_tensor() -> None:
    """The LM head gets the last token's row of the hidden states: a view at an offset."""
    hidden = torch.randn(3, 2, 96, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.randn(7, 96, dtype=torch.bfloat16, device=DEVICE)
    x = hidden[2, 1:]
    assert_within_ulps(gemv.gemv_triton(x, weight, None), reference(x, weight, None), x.dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("intermediate", "k"), [(5, 64), (12, 1100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_silu_and_mul_epilogue_matches_the_two_kernels(
    intermediate: int, k: int, dtype: torch.dtype, with_bias: bool
) -> None:
    """Gate row i and up row i are one program's pair: its epilogue rounds like the stored
    projection followed by ``silu_and_mul``."""
    generator = torch.Generator().manual_seed(intermediate)
    x = torch.randn(1, k, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(2 * intermediate, k, generator=generator) / k**0.5).to(DEVICE, dtype)
    bias = torch.randn(2 * intermediate, generator=generator).to(DEVICE, dtype)
    bias = bias if with_bias else None
    fused = gemv.gemv_triton(x, weight, bias, silu_and_mul=True)
    two_kernels = fused_kernels.silu_and_mul_torch(gemv.gemv_triton(x, weight, bias))
    assert fused.shape == (1, intermediate)
    assert_within_ulps(fused, two_kernels.double(), dtype)


def test_linear_silu_and_mul_off_cuda_is_the_two_ops() -> None:
    x, weight = torch.randn(3, 40, dtype=torch.bfloat16), torch.randn(24, 40, dtype=torch.bfloat16)
    for rows in (x[:1], x):
        expected = fused_kernels.silu_and_mul(F.linear(rows, weight))
        assert torch.equal(gemv.linear_silu_and_mul(rows, weight), expected)


@pytest.mark.skipif(not ON_CUDA, reason="the GEMV is chosen for CUDA tensors only")
def test_linear_uses_the_gemv_for_one_row_on_cuda() -> None:
    weight = torch.randn(64, 256, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(gemv.linear(x[:1], weight), gemv.gemv_triton(x[:1], weight, None))
    assert torch.equal(gemv.linear(x, weight), F.linear(x, weight))
    fused = gemv.gemv_triton(x[:1], weight, None, silu_and_mul=True)
    assert torch.equal(gemv.linear_silu_and_mul(x[:1], weight), fused)
