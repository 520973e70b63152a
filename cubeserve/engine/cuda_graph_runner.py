"""CUDA graphs for decode: capture one forward per batch size, replay padded batches.

Decode is launch-bound at small batch sizes (dozens of tiny kernels per layer), so each
captured graph replays a whole forward with one launch. Inputs live in static buffers sized
for the largest captured batch; a batch of size ``n`` is copied in and padded up to the next
captured size with dummy requests that decode one token at position 0 of request row 0 and
write their K/V into the reserved padding slot 0 (every ``req_to_token`` entry is a valid slot,
so their reads stay in bounds; their outputs are dropped).

The attention backend's ``init_forward_metadata`` is captured together with the model, so
only backends whose decode metadata is computed on the device from ``batch.seq_lens`` and
``batch.req_pool_indices`` qualify: they declare ``supports_cuda_graph = True``.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.mem_cache.kv_pool import PADDING_ROW, PADDING_SLOT

if TYPE_CHECKING:
    from cubeserve.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including ``max_bs``."""
    sizes = {bs for bs in (1, 2, 4, *range(8, max_bs + 1, 8)) if bs <= max_bs}
    return sorted(sizes | {max_bs})


class CudaGraphRunner:
    def __init__(self, model_runner: ModelRunner) -> None:
        self.model = model_runner.model
        self.attn_backend = model_runner.attn_backend
        self.kv_cache = model_runner.kv_cache
        self.req_to_token_pool = model_runner.req_to_token_pool
        max_bs = min(model_runner.server_args.cuda_graph_max_bs, model_runner.max_running_requests)
        self.batch_sizes: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

        device = model_runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.full((max_bs,), PADDING_SLOT, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.full((max_bs,), PADDING_ROW, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self._capture_all(capture_batch_sizes(max_bs))

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode.is_decode
            and bool(self.batch_sizes)
            and batch.batch_size <= self.batch_sizes[-1]
            and batch.mm_embeds is None
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[batch_size, vocab]``: a view of the graph's output, valid until the next
        replay."""
        bs = batch.batch_size
        padded_bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if padded_bs > bs:  # a larger earlier batch left real requests in the padding
            self.out_cache_loc[bs:padded_bs].fill_(PADDING_SLOT)
            self.req_pool_indices[bs:padded_bs].fill_(PADDING_ROW)
            self.seq_lens[bs:padded_bs].fill_(1)
        self.graphs[padded_bs].replay()
        return self.outputs[padded_bs][:bs]

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=[1] * bs,
            req_to_token_pool=self.req_to_token_pool,
            kv_cache=self.kv_cache,
            attn_backend=self.attn_backend,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        self.attn_backend.init_forward_metadata(batch)
        return self.model.forward(batch)

    @torch.inference_mode()
    def _capture_all(self, batch_sizes: list[int]) -> None:
        start = time.perf_counter()
        pool = None
        # Largest first: smaller graphs then fit in the memory the largest one left in the pool.
        for bs in reversed(batch_sizes):
            batch = self._static_batch(bs)
            for _ in range(2):  # compile kernels and create library handles outside the capture
                self._forward(batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(batch)
            pool = graph.pool()
            self.graphs[bs] = graph
        self.batch_sizes = batch_sizes
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s",
            batch_sizes,
            time.perf_counter() - start,
        )
