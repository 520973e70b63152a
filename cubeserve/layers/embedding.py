"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous block of ``ceil(vocab / tp_size)`` rows; padding rows at the end
of the last block are never looked up and their logits are cut off. Lookups outside a rank's
block contribute zeros to the all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cubeserve.distributed import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from cubeserve.layers.gemv import linear
from cubeserve.models.weights import default_weight_loader, new_parameter


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = new_parameter(
            self.rows_per_rank, embedding_dim, weight_loader=self.weight_loader
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(
                f"vocab size {loaded.shape[0]} in checkpoint, {self.num_embeddings} in config"
            )
        rows = self.vocab_end - self.vocab_start
        default_weight_loader(param.data[:rows], loaded[self.vocab_start : self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_block = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_block, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(~in_block.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding (tie them by sharing ``weight``)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the full vocabulary, on every rank."""
        logits = tp_all_gather(linear(hidden, self.weight))
        return logits[..., : self.num_embeddings].float()
