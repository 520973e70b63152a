"""The requests of one forward and how many new tokens each contributes, flattened into a
``ForwardBatch``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.mem_cache.kv_pool import ReqToTokenPool
from cubeserve.scheduler.request import Req


@dataclass
class ScheduleBatch:
    """Request ``i`` computes ``fill_ids[kv_len : kv_len + extend_lens[i]]``.

    EXTEND: chunks of prompts, each possibly after a cached prefix. DECODE: each request feeds
    its last output token. The last ``num_decoding`` requests are running requests decoding:
    all of a DECODE batch, and in a mixed batch (an EXTEND batch, ``mixed_with_decode``) the
    ones riding along as 1-token extends on top of their whole KV.
    """

    mode: ForwardMode
    reqs: list[Req]
    extend_lens: list[int]
    num_decoding: int = 0

    @classmethod
    def extend(cls, reqs: list[Req], extend_lens: list[int]) -> ScheduleBatch:
        return cls(ForwardMode.EXTEND, reqs, extend_lens)

    @classmethod
    def decode(cls, reqs: list[Req]) -> ScheduleBatch:
        return cls(ForwardMode.DECODE, reqs, [1] * len(reqs), num_decoding=len(reqs))

    def mixed_with_decode(self, running: list[Req]) -> ScheduleBatch:
        """This extend batch plus one decode token of each of ``running``."""
        return ScheduleBatch(
            ForwardMode.EXTEND,
            self.reqs + running,
            self.extend_lens + [1] * len(running),
            num_decoding=self.num_decoding + len(running),
        )

    @property
    def prefill_reqs(self) -> list[Req]:
        """The requests computing prompt tokens (or recomputing outputs after a retraction)."""
        return self.reqs[: len(self.reqs) - self.num_decoding]

    @property
    def num_new_tokens(self) -> int:
        return sum(self.extend_lens)

    def to_forward_batch(
        self, out_cache_loc: torch.Tensor, req_to_token_pool: ReqToTokenPool, device: torch.device
    ) -> ForwardBatch:
        """Record the new tokens' KV slots (``out_cache_loc``, flat over the batch) in the
        request rows and build the flat model inputs."""
        input_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for req, n in zip(self.reqs, self.extend_lens):
            input_ids += self._new_token_ids(req, n)
            positions += range(req.kv_len, req.kv_len + n)
            rows += [req.req_pool_idx] * n
        prefix_lens = [req.kv_len for req in self.reqs]
        seq_lens = [p + n for p, n in zip(prefix_lens, self.extend_lens)]

        positions_t = _to(positions, torch.int64, device)
        out_cache_loc = out_cache_loc.to(device, non_blocking=True)
        req_to_token_pool.req_to_token[_to(rows, torch.int64, device), positions_t] = out_cache_loc

        batch = ForwardBatch(
            mode=self.mode,
            batch_size=len(self.reqs),
            input_ids=_to(input_ids, torch.int64, device),
            positions=positions_t,
            req_pool_indices=_to([req.req_pool_idx for req in self.reqs], torch.int64, device),
            seq_lens=_to(seq_lens, torch.int32, device),
            out_cache_loc=out_cache_loc,
            seq_lens_cpu=seq_lens,
            req_to_token_pool=req_to_token_pool,
        )
        if self.mode is ForwardMode.EXTEND:
            batch.extend_prefix_lens_cpu = prefix_lens
            batch.extend_seq_lens_cpu = list(self.extend_lens)
            self._add_multimodal(batch, device)
        return batch

    @staticmethod
    def _new_token_ids(req: Req, n: int) -> list[int]:
        """``fill_ids[kv_len : kv_len + n]`` without copying the prompt when decoding."""
        start = req.kv_len - len(req.origin_input_ids)
        if start >= 0:
            return req.output_ids[start : start + n]
        return req.fill_ids[req.kv_len : req.kv_len + n]

    def _add_multimodal(self, batch: ForwardBatch, device: torch.device) -> None:
        """Slice each request's media rows for the chunk it computes in this forward."""
        masks: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        for req, n in zip(self.reqs, self.extend_lens):
            chunk = req.mm_rows(req.kv_len, req.kv_len + n)
            if chunk is None:
                masks.append(torch.zeros(n, dtype=torch.bool))
            else:
                masks.append(chunk[0])
                rows.append(chunk[1])
        if rows:
            batch.mm_mask = torch.cat(masks).to(device, non_blocking=True)
            batch.mm_embeds = torch.cat([r.to(device) for r in rows])


def _to(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
