"""Triton paged attention (``--attention-backend triton``), the default on CUDA.

Extend batches get their per-request offsets once per forward (one small host-to-device
copy). Decode batches need no host data at all: the kernels read ``seq_lens`` and
``req_pool_indices`` straight from the batch, so a CUDA graph captured over static copies of
those tensors replays correctly with new values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import triton

from cubeserve.attention.base import AttentionBackend, register_attention_backend
from cubeserve.attention.triton_kernels import (
    DecodeScratch,
    decode_attention,
    extend_attention,
)
from cubeserve.engine.forward_batch import ForwardBatch
from cubeserve.layers.attention import PagedAttention
from cubeserve.utils import to_device

MAX_KV_SPLITS = 64
# Even a batch that fills the device splits long contexts: the longest request otherwise sets
# the kernel's time (batch 136, contexts 100-1600 tokens on an H100: 4 chunks 4% faster than 1).
MIN_KV_SPLITS = 4
# The interpreter (CPU) runs programs one by one; a few chunks still exercise the merge.
CPU_PARALLELISM = 4


def max_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Chunks per request so that decode launches about two programs per multiprocessor."""
    wanted = max(triton.cdiv(2 * num_sms, batch_size * num_kv_heads), MIN_KV_SPLITS)
    return min(triton.next_power_of_2(wanted), MAX_KV_SPLITS)


@dataclass
class DecodeMetadata:
    batch_size: int
    num_sms: int
    device: torch.device
    # Flash-decoding scratch, allocated on first use and shared by every layer of the forward.
    _scratch: dict[tuple[int, int, int], DecodeScratch] = field(default_factory=dict)

    def scratch(self, layer: PagedAttention) -> DecodeScratch:
        key = (layer.num_heads, layer.num_kv_heads, layer.head_dim)
        if key not in self._scratch:
            splits = max_kv_splits(self.batch_size, layer.num_kv_heads, self.num_sms)
            self._scratch[key] = DecodeScratch.allocate(self.batch_size, *key, splits, self.device)
        return self._scratch[key]


@dataclass
class ExtendMetadata:
    prefix_lens: torch.Tensor  # [batch] int32
    extend_lens: torch.Tensor  # [batch] int32
    extend_starts: torch.Tensor  # [batch] int32, first new token of each request
    max_extend_len: int


@register_attention_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graph = True  # decode metadata is computed on the device (see module doc)

    def __init__(self) -> None:
        self._num_sms: dict[torch.device, int] = {}

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        if batch.mode.is_decode:
            batch.attn_metadata = DecodeMetadata(
                batch.batch_size, self._parallelism(device), device
            )
            return
        extend_lens = batch.extend_seq_lens_cpu
        prefix_lens = [s - e for s, e in zip(batch.seq_lens_cpu, extend_lens)]
        starts = [0, *itertools.accumulate(extend_lens[:-1])]
        # Rows padded to 16 bytes, so that each starts 16-byte aligned whatever the batch size.
        # Triton specializes pointer arguments on that alignment: unpadded rows gave the extend
        # kernel three variants by batch size mod 4, each compiled (~1 s) mid-serving.
        width = triton.cdiv(len(extend_lens), 4) * 4
        rows = [row + [0] * (width - len(row)) for row in (prefix_lens, extend_lens, starts)]
        table = to_device(rows, torch.int32, device)
        batch.attn_metadata = ExtendMetadata(table[0], table[1], table[2], max(extend_lens))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: PagedAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        num_tokens, head_dim = q.shape[0], layer.head_dim
        self.store_kv(k, v, layer, batch)
        cache = batch.kv_cache
        k_buffer, v_buffer = cache.k_buffers[layer.layer_id], cache.v_buffers[layer.layer_id]
        out = torch.empty((num_tokens, layer.num_heads, head_dim), dtype=q.dtype, device=q.device)
        queries = q.view(num_tokens, layer.num_heads, head_dim).to(k_buffer.dtype)
        req_to_token = batch.req_to_token_pool.req_to_token
        meta = batch.attn_metadata
        if batch.mode.is_decode:
            decode_attention(
                queries,
                out,
                k_buffer,
                v_buffer,
                req_to_token,
                batch.req_pool_indices,
                batch.seq_lens,
                meta.scratch(layer),
                layer.scaling,
            )
        else:
            extend_attention(
                queries,
                out,
                k_buffer,
                v_buffer,
                req_to_token,
                batch.req_pool_indices,
                meta.prefix_lens,
                meta.extend_lens,
                meta.extend_starts,
                meta.max_extend_len,
                layer.scaling,
            )
        return out.view(num_tokens, layer.num_heads * head_dim)

    def _parallelism(self, device: torch.device) -> int:
        if device.type != "cuda":
            return CPU_PARALLELISM
        if device not in self._num_sms:
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms[device]
