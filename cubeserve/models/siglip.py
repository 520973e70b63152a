"""SigLIP vision tower as Quicksviewer uses it.

Parameter names match HF's ``SiglipVisionModel`` (``vision_model.embeddings.*``, ``vision_model.encoder.layers.N.*``).
The feature is the output of the LAST encoder layer without ``post_layernorm`` (so that module and the pooling
head are not built), resized to a fixed 24x24 grid.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig

# Every frame / view is represented by a 24x24 token grid, whatever the tower's own patch grid is.
FEATURE_GRID = 24
TOKENS_PER_FRAME = FEATURE_GRID * FEATURE_GRID


def _as_int(value: int | list[int] | tuple[int, ...]) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotImplementedError(f"non-square SigLIP size {value} is not supported")
        return int(value[0])
    return int(value)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        image_size = _as_int(config.image_size)
        patch_size = _as_int(config.patch_size)
        self.grid = image_size // patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (N, D, g, g)
        # (N, g*g, D), row-major. Made contiguous here: a transposed layout would otherwise
        # propagate through every residual add and force copies before every LayerNorm.
        tokens = patches.flatten(2).transpose(1, 2).contiguous()
        return tokens + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if dim % self.num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {self.num_heads}")
        self.head_dim = dim // self.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        n, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise NotImplementedError(f"SigLIP hidden_act {config.hidden_act!r} is not supported")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixel_values))


@functools.lru_cache(maxsize=8)
def bilinear_resize_matrix(
    grid: int, target: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(target*target, grid*grid) weights of ``F.interpolate(mode="bilinear",
    align_corners=False)`` from a grid x grid to a target x target map, row-major; in ``dtype``
    when it holds them exactly (27 -> 24 gives multiples of 1/256), else in float32."""
    basis = torch.eye(grid * grid, dtype=torch.float64).view(-1, 1, grid, grid)
    weights = F.interpolate(basis, size=(target, target), mode="bilinear", align_corners=False)
    weights = weights.view(grid * grid, target * target).T.contiguous()
    exact = torch.equal(weights.to(dtype).to(torch.float64), weights)
    return weights.to(device, dtype if exact else torch.promote_types(dtype, torch.float32))


def resize_token_grid(tokens: torch.Tensor, grid: int, target: int = FEATURE_GRID) -> torch.Tensor:
    """Bilinearly resize (N, grid*grid, D) row-major tokens to (N, target*target, D).

    As one matmul with the interpolation weights, not ``F.interpolate`` on (N, D, g, g) maps,
    whose CUDA kernel took 27 ms per 64 SigLIP-so400m frames on an H100, a sixth of the
    tower's time.
    """
    if grid == target:
        return tokens
    weights = bilinear_resize_matrix(grid, target, tokens.device, tokens.dtype)
    return torch.matmul(weights, tokens.to(weights.dtype)).to(tokens.dtype)


class SiglipVisionTower(nn.Module):
    """Frames/views (N, 3, S, S) -> last-layer features on the 24x24 grid, (N, 576, Dv)."""

    def __init__(self, config: SiglipVisionConfig, max_batch_size: int = 64) -> None:
        super().__init__()
        self.config = config
        self.max_batch_size = max_batch_size
        self.vision_model = SiglipVisionTransformer(config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _forward_chunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_model(pixel_values)
        return resize_token_grid(tokens, self.vision_model.embeddings.grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        if pixel_values.shape[0] <= self.max_batch_size:
            return self._forward_chunk(pixel_values)
        chunks = pixel_values.split(self.max_batch_size)
        return torch.cat([self._forward_chunk(chunk) for chunk in chunks])
