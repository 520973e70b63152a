"""ModelRunner's decisions that need no model: the dtype and whether decode uses CUDA graphs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cubeserve.attention.base import create_attention_backend
from cubeserve.attention.torch_backend import TorchAttentionBackend
from cubeserve.engine.model_runner import resolve_dtype, use_cuda_graphs
from cubeserve.server_args import ServerArgs

CUDA = torch.device("cuda")  # only a name here: nothing runs on it


def config(text: SimpleNamespace | None = None, **attrs: object) -> SimpleNamespace:
    """A config with only the given attributes (transformers < 4.56 has no ``dtype``)."""
    outer = SimpleNamespace(**attrs)
    outer.get_text_config = lambda: text or outer
    return outer


@pytest.mark.parametrize(
    ("model_config", "expected"),
    [
        (config(torch_dtype="float16"), torch.float16),  # transformers 4.44 names it torch_dtype
        (config(dtype=torch.float16, torch_dtype=None), torch.float16),  # >= 4.56: dtype
        (config(text=config(dtype="bfloat16"), dtype="float32"), torch.bfloat16),  # the LM's wins
        (config(text=config(dtype=None), torch_dtype="float16"), torch.float16),
        (config(dtype=None), torch.bfloat16),  # none named
    ],
)
def test_auto_dtype_on_cuda_is_the_checkpoints(model_config: SimpleNamespace, expected: torch.dtype) -> None:
    assert resolve_dtype("auto", model_config, CUDA) == expected


def test_auto_dtype_on_cpu_is_float32_and_explicit_dtypes_win() -> None:
    half = config(torch_dtype="float16")
    assert resolve_dtype("auto", half, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", half, CUDA) == torch.bfloat16


class GraphSafeBackend(TorchAttentionBackend):
    supports_cuda_graph = True


def test_cuda_graphs_only_for_backends_that_support_them(caplog: pytest.LogCaptureFixture) -> None:
    args = ServerArgs()
    assert use_cuda_graphs(CUDA, args, GraphSafeBackend())
    assert not use_cuda_graphs(torch.device("cpu"), args, GraphSafeBackend())
    assert not use_cuda_graphs(CUDA, ServerArgs(disable_cuda_graph=True), GraphSafeBackend())
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert not use_cuda_graphs(CUDA, args, create_attention_backend("torch"))
    assert "TorchAttentionBackend cannot be captured in CUDA graphs" in caplog.text
