"""The flat batch every model forward consumes.

A forward never loops over requests in Python: token ids, positions and KV slots of all
requests are concatenated, and per-request lengths live in small tensors the attention
backend turns into its own metadata (``attn_metadata``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

import torch

from cubeserve.utils import to_device

if TYPE_CHECKING:
    from cubeserve.attention.base import AttentionBackend
    from cubeserve.mem_cache.kv_pool import KVCache, ReqToTokenPool


class ForwardMode(Enum):
    EXTEND = auto()  # prefill (possibly a chunk, possibly on top of a cached prefix)
    DECODE = auto()  # exactly one new token per request

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    req_pool_indices: torch.Tensor  # [batch_size] int64, rows of ReqToTokenPool
    seq_lens: torch.Tensor  # [batch_size] int32, KV length after this forward
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slots receiving the new tokens
    seq_lens_cpu: list[int]
    # Extend only: cached prefix length and number of new tokens of each request.
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    # Multimodal: rows of ``mm_embeds`` replace the token embeddings where ``mm_mask`` is set.
    mm_embeds: torch.Tensor | None = None  # [num_mm_tokens, hidden]
    mm_mask: torch.Tensor | None = None  # [num_tokens] bool
    req_to_token_pool: ReqToTokenPool | None = None
    kv_cache: KVCache | None = None
    attn_backend: AttentionBackend | None = None
    attn_metadata: Any = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_indices(self) -> torch.Tensor:
        """Index of each request's last new token inside the flat token dimension."""
        if self.mode.is_decode:
            return torch.arange(self.batch_size, device=self.input_ids.device)
        lens = to_device(self.extend_seq_lens_cpu, torch.int64, self.input_ids.device)
        return torch.cumsum(lens, dim=0) - 1
