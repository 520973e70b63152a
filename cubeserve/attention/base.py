"""Attention backend contract and the by-name registry (``--attention-backend``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from cubeserve.engine.forward_batch import ForwardBatch
    from cubeserve.layers.attention import PagedAttention


class AttentionBackend(ABC):
    """Writes the new K/V of a layer into the paged cache and attends over the cache.

    ``init_forward_metadata`` runs once per forward (not per layer) and stores whatever the
    backend needs in ``batch.attn_metadata``.

    ``supports_cuda_graph``: decode (metadata included) can be captured in a CUDA graph and
    replayed with new batch tensors, i.e. it reads no per-batch host data.
    """

    supports_cuda_graph: ClassVar[bool] = False

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        layer: PagedAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        ...

    @staticmethod
    def store_kv(
        k: torch.Tensor, v: torch.Tensor, layer: PagedAttention, batch: ForwardBatch
    ) -> None:
        """Write the new tokens' K/V of ``layer`` into their slots (``batch.out_cache_loc``)."""
        shape = (k.shape[0], layer.num_kv_heads, layer.head_dim)
        batch.kv_cache.set_kv(layer.layer_id, batch.out_cache_loc, k.view(shape), v.view(shape))


_BACKENDS: dict[str, Callable[..., AttentionBackend]] = {}


def register_attention_backend(name: str) -> Callable:
    def wrap(factory: Callable[..., AttentionBackend]) -> Callable[..., AttentionBackend]:
        _BACKENDS[name] = factory
        return factory

    return wrap


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    import cubeserve.attention.backends  # noqa: F401  (registers the built-in backends)

    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name](**kwargs)
