"""Rotary position embedding (rotate-half / NeoX layout) with Llama-3 frequency scaling.

One ``RotaryEmbedding`` per model holds a float32 cos/sin table for every position; a forward
gathers it once by ``positions`` and every layer applies the result to its q and k with
``cubeserve.layers.fused_kernels.rotary_emb``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponents)


def llama3_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1 scaling: low frequencies slowed by ``factor``, high ones kept, blended between."""
    inv_freq = default_inv_freq(head_dim, base)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


_INV_FREQ_BY_ROPE_TYPE: dict[str, Callable[[int, float, dict], torch.Tensor]] = {
    "default": lambda head_dim, base, params: default_inv_freq(head_dim, base),
    "llama3": lambda head_dim, base, params: llama3_inv_freq(
        head_dim,
        base,
        params["factor"],
        params["low_freq_factor"],
        params["high_freq_factor"],
        params["original_max_position_embeddings"],
    ),
}


def rope_parameters(config: PretrainedConfig) -> dict:
    """``rope_theta`` plus the scaling fields, from transformers 5 or 4 style configs."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": config.rope_theta}
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
        # [max_position, head_dim]: cos of every frequency, then sin of every frequency.
        self.register_buffer(
            "cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False
        )

    @classmethod
    def from_config(cls, config: PretrainedConfig, head_dim: int) -> RotaryEmbedding:
        params = rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in _INV_FREQ_BY_ROPE_TYPE:
            supported = sorted(_INV_FREQ_BY_ROPE_TYPE)
            raise NotImplementedError(
                f"rope_type {rope_type!r} is not supported; supported: {supported}"
            )
        inv_freq = _INV_FREQ_BY_ROPE_TYPE[rope_type](head_dim, params["rope_theta"], params)
        return cls(head_dim, config.max_position_embeddings, inv_freq)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [num_tokens, 1, head_dim // 2], broadcastable over heads."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin
