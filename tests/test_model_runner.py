"""ModelRunner: the dtype, whether decode uses CUDA graphs, the start-up prefill warm-up; and
the Triton backend's extend metadata layout."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cubeserve.attention.base import create_attention_backend
from cubeserve.attention.torch_backend import TorchAttentionBackend
from cubeserve.attention.triton_backend import TritonAttentionBackend
from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.engine.model_runner import (
    ModelRunner,
    load_model_config,
    resolve_dtype,
    use_cuda_graphs,
)
from cubeserve.mem_cache.kv_pool import PADDING_SLOT
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
def test_auto_dtype_on_cuda_is_the_checkpoints(
    model_config: SimpleNamespace, expected: torch.dtype
) -> None:
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


def test_start_up_warm_up_prefill_writes_only_the_padding_slot(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("qwen2")
    runner = ModelRunner(
        ServerArgs(model_path=str(checkpoint), max_total_tokens=64),
        load_model_config(checkpoint),
    )
    assert runner.token_allocator.available_size() == 64
    assert not runner.req_to_token_pool.req_to_token.any()
    for buffers in (runner.kv_cache.k_buffers, runner.kv_cache.v_buffers):
        for layer in buffers:
            assert layer[PADDING_SLOT].any()  # the warm-up's dummy prompt ran every layer
            assert not layer[PADDING_SLOT + 1 :].any()


@pytest.mark.parametrize("batch_size", range(1, 10))
def test_extend_metadata_rows_start_16_byte_aligned(batch_size: int) -> None:
    """Triton compiles a kernel variant per pointer alignment: rows at batch-dependent offsets
    recompiled the extend kernel mid-serving."""
    lens = list(range(1, batch_size + 1))
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        batch_size=batch_size,
        input_ids=torch.zeros(sum(lens), dtype=torch.int64),
        positions=torch.zeros(sum(lens), dtype=torch.int64),
        req_pool_indices=torch.arange(batch_size),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        out_cache_loc=torch.zeros(sum(lens), dtype=torch.int64),
        seq_lens_cpu=[2 * n for n in lens],
        extend_prefix_lens_cpu=lens,
        extend_seq_lens_cpu=lens,
    )
    TritonAttentionBackend().init_forward_metadata(batch)
    meta = batch.attn_metadata
    rows = (meta.prefix_lens, meta.extend_lens, meta.extend_starts)
    assert all(row.data_ptr() % 16 == 0 for row in rows)
    assert [row[:batch_size].tolist() for row in rows] == [
        lens,
        lens,
        [sum(lens[:i]) for i in range(batch_size)],
    ]
    assert meta.max_extend_len == batch_size
