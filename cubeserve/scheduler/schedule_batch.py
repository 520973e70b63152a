"""The requests of one forward and how many new tokens each contributes, flattened into a
``ForwardBatch``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.engine.sampler import PendingSample
from cubeserve.mem_cache.kv_pool import ReqToTokenPool
from cubeserve.scheduler.request import Req
from cubeserve.utils import to_device


@dataclass(eq=False)
class InflightBatch:
    """A launched forward whose sampled tokens have not reached the host: request ``reqs[i]``
    sampled ``sample.next_ids[i]``."""

    reqs: list[Req]
    sample: PendingSample

    def __post_init__(self) -> None:
        self.row_of = {req: i for i, req in enumerate(self.reqs)}


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
        self,
        out_cache_loc: torch.Tensor,
        req_to_token_pool: ReqToTokenPool,
        device: torch.device,
        inflight: InflightBatch | None = None,
    ) -> ForwardBatch:
        """Record the new tokens' KV slots (``out_cache_loc``, flat over the batch, on the host)
        in the request rows and build the flat model inputs. Requests with a pending token
        (sampled by ``inflight``, the forward still running) read it on the device."""
        input_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        pending_at: list[int] = []  # where pending tokens go in ``input_ids``
        pending_rows: list[int] = []  # and their rows in ``inflight``'s sampled tokens
        for req, n in zip(self.reqs, self.extend_lens):
            if req.num_pending_tokens:  # a running request decoding: its only new token
                pending_at.append(len(input_ids))
                pending_rows.append(inflight.row_of[req])
                input_ids.append(0)
            else:
                input_ids += self._new_token_ids(req, n)
            positions += range(req.kv_len, req.kv_len + n)
            rows += [req.req_pool_idx] * n
        prefix_lens = [req.kv_len for req in self.reqs]
        seq_lens = [p + n for p, n in zip(prefix_lens, self.extend_lens)]

        host_positions = torch.tensor(positions, dtype=torch.int64)
        host_rows = torch.tensor(rows, dtype=torch.int64)
        positions_t, slots_t = req_to_token_pool.write(host_rows, host_positions, out_cache_loc)
        input_ids_t = to_device(input_ids, torch.int64, device)
        if pending_at:
            sampled = inflight.sample.next_ids[to_device(pending_rows, torch.int64, device)]
            input_ids_t[to_device(pending_at, torch.int64, device)] = sampled

        batch = ForwardBatch(
            mode=self.mode,
            batch_size=len(self.reqs),
            input_ids=input_ids_t,
            positions=positions_t,
            req_pool_indices=to_device(
                [req.req_pool_idx for req in self.reqs], torch.int64, device
            ),
            seq_lens=to_device(seq_lens, torch.int32, device),
            out_cache_loc=slots_t,
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
            batch.mm_mask = to_device(torch.cat(masks), torch.bool, device)
            batch.mm_embeds = torch.cat([r.to(device) for r in rows])
