"""The paged attention layer models call; the configured backend does the work."""

from __future__ import annotations

import torch
from torch import nn

from cubeserve.engine.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    def __init__(
        self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        return batch.attn_backend.forward(q, k, v, self, batch)
