"""A request as the scheduler tracks it, from arrival to finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch

from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.mem_cache.radix_cache import TreeNode
from cubeserve.multimodal.transport import MEDIA_NOT_CACHED


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None  # the stop token id or stop string
    message: str | None = None  # why an abort happened
    status_code: int | None = None  # HTTP status of an abort the client should see as an error
    # The request named media by reference that the encoder cache no longer holds; the
    # frontend resends it with pixels (``cubeserve.multimodal.transport``).
    media_not_cached: bool = False

    @classmethod
    def rejected(cls, message: str, status_code: int = HTTPStatus.BAD_REQUEST) -> FinishReason:
        """A request the engine refuses before running it."""
        return cls("abort", message=message, status_code=int(status_code))

    def to_dict(self) -> dict[str, Any]:
        reason: dict[str, Any] = {"type": self.type, "matched": self.matched}
        if self.message is not None:
            reason["message"] = self.message
        if self.status_code is not None:
            reason["status_code"] = self.status_code
        if self.media_not_cached:
            reason[MEDIA_NOT_CACHED] = True
        return reason


@dataclass(eq=False)
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False

    # Multimodal: the scheduler's ``mm_encoder`` turns ``mm_inputs`` into embeddings that
    # replace the token embeddings at the prompt positions where ``mm_mask`` is set, and
    # rewrites ``origin_input_ids`` so that those positions hold pad ids derived from the media
    # content hash: the radix cache keys on plain ids. Text requests: all None.
    mm_inputs: Any = None
    mm_embeds: torch.Tensor | None = None  # [mm_mask.sum(), hidden]
    mm_mask: torch.Tensor | None = None  # [len(origin_input_ids)] bool
    mm_meta: dict[str, Any] | None = None  # reported back once with the first output

    output_ids: list[int] = field(default_factory=list)
    # Overlap schedule: tokens sampled by forwards whose results the host has not taken in yet
    # (at most one while scheduling; two between a launch and the previous forward's
    # processing). They count in ``fill_len`` (the next forward computes the KV of the last,
    # reading it on the device) but are not in ``output_ids`` or ``fill_ids`` yet.
    num_pending_tokens: int = 0
    finish_reason: FinishReason | None = None

    # KV state: row ``req_pool_idx`` of the ReqToTokenPool holds the slots of the first
    # ``kv_len`` tokens of ``fill_ids``; the first ``prefix_len`` of them belong to the radix
    # cache, locked through ``last_node``.
    req_pool_idx: int | None = None
    kv_len: int = 0
    prefix_len: int = 0
    last_node: TreeNode | None = None

    cached_tokens: int | None = None  # prefix-cache hit of the first prefill
    num_sent_ids: int = 0  # output ids already sent to the frontend
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV the request needs: the prompt and the outputs on the host."""
        return self.origin_input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids) + self.num_pending_tokens

    @property
    def sampled_all(self) -> bool:
        """Whether all ``max_new_tokens`` are sampled, the last one possibly still pending."""
        num_sampled = len(self.output_ids) + self.num_pending_tokens
        return num_sampled >= self.sampling_params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def mm_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mask of fill positions ``[start, end)`` and the embedding rows they take, if any."""
        if self.mm_mask is None or start >= len(self.mm_mask):
            return None
        mask = self.mm_mask[start:end]
        if not bool(mask.any()):
            return None
        first_row = int(self.mm_mask[:start].sum())
        rows = self.mm_embeds[first_row : first_row + int(mask.sum())]
        padded = torch.zeros(end - start, dtype=torch.bool)
        padded[: len(mask)] = mask.cpu()
        return padded, rows

    def reset_kv_state(self) -> None:
        """Forget all KV (after the scheduler released it): the request will be recomputed."""
        self.req_pool_idx, self.kv_len, self.prefix_len, self.last_node = None, 0, 0, None

