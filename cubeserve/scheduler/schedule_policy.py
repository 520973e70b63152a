"""Admission order of waiting requests and the KV kept in reserve for running ones."""

from __future__ import annotations

import math

from cubeserve.mem_cache.radix_cache import RadixCache
from cubeserve.scheduler.request import Req

# Beyond this many waiting requests, matching each against the tree costs more than LPM saves.
LPM_MAX_WAITING = 128
# Longer generations are assumed to stop early; caps each request's reservation.
CLIP_MAX_NEW_TOKENS = 4096


class SchedulePolicy:
    """``fcfs``: arrival order. ``lpm``: longest cached prefix first (SGLang), so requests
    sharing a prefix run together while it is still cached."""

    def __init__(self, policy: str, tree_cache: RadixCache) -> None:
        if policy not in ("fcfs", "lpm"):
            raise ValueError(f"unknown schedule policy {policy!r}")
        self.policy = policy
        self.tree_cache = tree_cache

    def sort_waiting(self, waiting: list[Req]) -> None:
        """Order ``waiting`` in place; the sort is stable, so ties keep arrival order."""
        if self.policy == "fcfs" or self.tree_cache.disable or len(waiting) > LPM_MAX_WAITING:
            return
        prefix_lens = {
            req.rid: len(self.tree_cache.match_prefix(prefix_match_key(req))[0]) for req in waiting
        }
        waiting.sort(key=lambda req: -prefix_lens[req.rid])


def prefix_match_key(req: Req) -> list[int]:
    """The part of a request that may come from the cache: all but its last token, which must
    be computed to get the logits of the next one."""
    return req.fill_ids[:-1]


class DecodeReservation:
    """How much KV running requests will still need, estimated as SGLang's ``new_token_ratio``.

    Each request is expected to produce ``ratio`` of its remaining ``max_new_tokens``. The ratio
    starts conservative, decays with every decode step while memory suffices, and returns to
    the start after a retraction.
    """

    def __init__(
        self, init_ratio: float = 0.7, min_ratio: float = 0.1, decay_steps: int = 600
    ) -> None:
        self.init_ratio = init_ratio
        self.min_ratio = min_ratio
        self.decay = (init_ratio - min_ratio) / decay_steps
        self.ratio = init_ratio

    def tokens(self, reqs: list[Req]) -> int:
        return sum(self.tokens_for(req) for req in reqs)

    def tokens_for(self, req: Req) -> int:
        remaining = req.sampling_params.max_new_tokens - len(req.output_ids)
        return math.ceil(min(remaining, CLIP_MAX_NEW_TOKENS) * self.ratio)

    def on_decode_step(self) -> None:
        self.ratio = max(self.min_ratio, self.ratio - self.decay)

    def on_retract(self) -> None:
        self.ratio = self.init_ratio
