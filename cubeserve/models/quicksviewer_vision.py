"""Quicksviewer visual path: SigLIP tower -> momentum cubing -> 3D perceiver resampler (+ thumbnail).

A video of T frames becomes ``[thumbnail?, cube_0, ..., cube_k]`` feature blocks of ``num_queries`` rows each;
every image view becomes one block. All numbers follow the original implementation (see the golden README).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cubeserve.configs.quicksviewer import QuicksviewerConfig
from cubeserve.models.siglip import FEATURE_GRID, TOKENS_PER_FRAME, SiglipVisionTower

CUBING_MOMENTUM = 0.8
CUBING_TEMPERATURE = 0.5
CUBING_LN_EPS = 1e-5
RESAMPLER_LN_EPS = 1e-6
SINCOS_BASE = 10000.0

DEFAULT_MAX_VIT_BATCH = 64
# Bounds the padded key length of one resampler attention call (about 113 frames).
DEFAULT_MAX_RESAMPLER_TOKENS = 65536


# --------------------------------------------------------------------------------------------------------------
# Weight names
# --------------------------------------------------------------------------------------------------------------

_ORIGINAL_TO_CUBESERVE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.vision_resampler.", "resampler."),
    ("model.cubing.agg_frame_fn.0.", "cubing.agg_proj."),
    ("model.cubing.proj_fn.0.", "cubing.norm."),
    ("model.cubing.proj_fn.1.", "cubing.fc1."),
    ("model.cubing.proj_fn.3.", "cubing.fc2."),
    ("model.cubing.thumbnail_fn.1.", "thumbnail.proj."),
)
_ORIGINAL_VISION_PREFIXES = ("model.vision_tower.", "model.vision_resampler.", "model.cubing.", "model.mm_projector.")
VISION_PREFIXES = ("vision_tower.", "resampler.", "cubing.", "thumbnail.")
# Present in checkpoints but never used: the tower feature is taken before post_layernorm and the pooling head.
UNUSED_VISION_PREFIXES = ("vision_tower.vision_model.post_layernorm.", "vision_tower.vision_model.head.")


def original_to_cubeserve_name(name: str) -> str:
    """Map an original Quicksviewer weight name to its cubeserve name.

    Vision weights are renamed; LM weights (``model.layers.*``, ``model.embed_tokens``, ``model.norm``,
    ``lm_head``) and names that already are cubeserve names are returned unchanged.
    """
    for old, new in _ORIGINAL_TO_CUBESERVE_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    if name.startswith(_ORIGINAL_VISION_PREFIXES):
        raise ValueError(f"unsupported Quicksviewer vision weight {name!r}")
    return name


def is_vision_weight(name: str) -> bool:
    """True for weights (original or cubeserve name) that belong to the vision encoder."""
    return original_to_cubeserve_name(name).startswith(VISION_PREFIXES)


def is_unused_vision_weight(name: str) -> bool:
    return original_to_cubeserve_name(name).startswith(UNUSED_VISION_PREFIXES)


# --------------------------------------------------------------------------------------------------------------
# Cubing
# --------------------------------------------------------------------------------------------------------------


def num_cube_boundaries(num_frames: int) -> int:
    """k = max(round(T/5) - 1, 1) (Python rounding), never more than the T-1 transitions."""
    if num_frames < 2:
        return 0
    return min(max(round(num_frames / 5) - 1, 1), num_frames - 1)


def momentum_matrix(n: int, beta: float = CUBING_MOMENTUM) -> torch.Tensor:
    """(n, n) matrix M with momentum = M @ diffs for m[0] = d[0], m[i] = beta*d[i] + (1-beta)*m[i-1]."""
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    decay = (1.0 - beta) ** (i - j).clamp(min=0)
    coef = torch.where(j <= i, beta * decay, torch.zeros(()))
    coef[:, 0] = (1.0 - beta) ** i[:, 0]
    return coef.to(torch.float32)


def frame_bounds_from_starts(start_frames: Sequence[int], num_frames: int) -> list[tuple[int, int]]:
    ends = list(start_frames[1:]) + [num_frames]
    return [(int(s), int(e)) for s, e in zip(start_frames, ends)]


@dataclass
class CubingResult:
    z_logits: torch.Tensor  # (T-1, 2) float32
    y_prob: torch.Tensor  # (T-1,) float32, softmax(z / 0.5)[:, 1]
    start_frames: list[int]  # first frame of every cube, starting with 0
    frame_bounds: list[tuple[int, int]]  # half-open [start, end) per cube


def _linear_f32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x, layer.weight.float(), bias)


class MomentumCubing(nn.Module):
    """Boundary classifier over frame transitions; the top-k transitions start new cubes."""

    def __init__(self, vision_dim: int) -> None:
        super().__init__()
        self.agg_proj = nn.Linear(vision_dim, vision_dim)
        self.norm = nn.LayerNorm(vision_dim, eps=CUBING_LN_EPS)
        self.fc1 = nn.Linear(vision_dim, vision_dim)
        self.fc2 = nn.Linear(vision_dim, 2)

    def logits(self, frame_features: torch.Tensor) -> torch.Tensor:
        """(T, 576, Dv) tower features -> (T-1, 2) boundary logits, always in float32.

        The original applies momentum and ``agg_proj`` per token and then averages the tokens. Both are affine,
        so averaging first is mathematically identical and 576x cheaper. Float32 keeps the discrete top-k
        decisions stable when the model runs in half precision.
        """
        means = frame_features.float().mean(dim=1)  # (T, Dv)
        diffs = means[1:] - means[:-1]
        momentum = momentum_matrix(diffs.shape[0]).to(diffs.device) @ diffs
        h = _linear_f32(momentum, self.agg_proj)
        h = F.layer_norm(h, h.shape[-1:], self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        h = F.gelu(_linear_f32(h, self.fc1))
        return _linear_f32(h, self.fc2)

    def forward(self, frame_features: torch.Tensor) -> CubingResult:
        num_frames = frame_features.shape[0]
        if num_frames < 2:  # a single frame is a single cube (the original crashes here)
            empty = frame_features.new_zeros((0, 2), dtype=torch.float32)
            return CubingResult(empty, empty[:, 1], [0], [(0, num_frames)])
        z = self.logits(frame_features)
        y = torch.softmax(z / CUBING_TEMPERATURE, dim=-1)[:, 1]
        transitions = torch.topk(y, num_cube_boundaries(num_frames)).indices
        starts = [0] + sorted(int(i) + 1 for i in transitions.tolist())
        return CubingResult(z, y, starts, frame_bounds_from_starts(starts, num_frames))


# --------------------------------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------------------------------


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(n,) positions -> (n, dim) = [sin(p * w), cos(p * w)], w_i = 1 / 10000^(i / (dim/2)), float32."""
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float32, device=positions.device) / half
    omega = 1.0 / SINCOS_BASE**omega
    angles = positions.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _pos_embed_dims(dim: int) -> tuple[int, int]:
    if dim % 16:
        raise ValueError(f"resampler width {dim} must be divisible by 16 for the 3D sin-cos embedding")
    return dim // 4, dim * 3 // 8


def spatial_pos_embed(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(576, 3*dim/4) row then column embedding of the 24x24 raster grid."""
    _, axis_dim = _pos_embed_dims(dim)
    coords = torch.arange(FEATURE_GRID, device=device)
    rows = coords.repeat_interleave(FEATURE_GRID)
    cols = coords.repeat(FEATURE_GRID)
    return torch.cat([sincos_1d(rows, axis_dim), sincos_1d(cols, axis_dim)], dim=-1)


def add_pos_embed_3d(x: torch.Tensor, frame_times: torch.Tensor) -> torch.Tensor:
    """x (B, n*576, D) + the 3D sin-cos embedding of (B, n) frame indices, without materialising the full
    (B, n*576, D) float32 table: the temporal part only varies per frame, the spatial part only per token."""
    batch, n = frame_times.shape
    dim = x.shape[-1]
    time_dim, _ = _pos_embed_dims(dim)
    x4 = x.view(batch, n, TOKENS_PER_FRAME, dim)
    temporal = sincos_1d(frame_times.reshape(-1), time_dim).view(batch, n, 1, time_dim).to(x.dtype)
    spatial = spatial_pos_embed(dim, x.device).to(x.dtype)
    keys = torch.cat([x4[..., :time_dim] + temporal, x4[..., time_dim:] + spatial], dim=-1)
    return keys.view(batch, n * TOKENS_PER_FRAME, dim)


class ResamplerAttention(nn.Module):
    """Multi-head attention with a packed (q, k, v) in-projection, named like ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        *lead, length, _ = x.shape
        return x.view(*lead, length, self.num_heads, self.head_dim).transpose(-3, -2)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries (Q, D) shared by the batch; keys/values (B, L, D); key_mask (B, L) True = attend."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        batch = keys.shape[0]
        q = self._heads(F.linear(queries, wq, bq)).expand(batch, -1, -1, -1)
        k = self._heads(F.linear(keys, wk, bk))
        v = self._heads(F.linear(values, wv, bv))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, hd)
        out = out.transpose(1, 2).reshape(batch, queries.shape[0], -1)
        return self.out_proj(out)


def plan_segment_groups(lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Group segments (longest first) so that every group's padded size count * max_len <= max_frames.

    Sorting by length keeps the padding small; a segment longer than the budget gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for idx in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_frames:
            groups.append(current)
            current = []
        current.append(idx)
    if current:
        groups.append(current)
    return groups


class PerceiverResampler(nn.Module):
    """``num_queries`` learned queries attend to the tokens of one segment (a cube or an image view)."""

    def __init__(
        self,
        vision_dim: int,
        dim: int,
        num_queries: int,
        num_heads: int,
        max_tokens_per_call: int = DEFAULT_MAX_RESAMPLER_TOKENS,
    ) -> None:
        super().__init__()
        _pos_embed_dims(dim)
        self.dim = dim
        self.max_tokens_per_call = max_tokens_per_call
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(vision_dim, dim, bias=False)
        self.attn = ResamplerAttention(dim, num_heads)
        self.ln_q = nn.LayerNorm(dim, eps=RESAMPLER_LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=RESAMPLER_LN_EPS)
        self.ln_post = nn.LayerNorm(dim, eps=RESAMPLER_LN_EPS)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def _pack(
        self, frame_features: torch.Tensor, segments: Sequence[tuple[int, int]], frame_times: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-pad the segments' frames to a common length: (B, n, 576, Dv), (B, n) times, (B, n) mask."""
        lengths = [end - start for start, end in segments]
        max_len = max(lengths)
        batch = len(segments)
        tiles_all = segments[0][0] == 0 and segments[-1][1] == frame_features.shape[0] == batch * max_len
        if tiles_all and all(start == i * max_len for i, (start, _) in enumerate(segments)):
            # Equal segments covering all frames in order (e.g. image views): a view, no copy.
            feats = frame_features.reshape(batch, max_len, *frame_features.shape[1:])
            return feats, frame_times.reshape(batch, max_len), None
        if all(length == max_len for length in lengths):
            feats = torch.stack([frame_features[s:e] for s, e in segments])
            times = torch.stack([frame_times[s:e] for s, e in segments])
            return feats, times, None
        feats = frame_features.new_zeros((batch, max_len, *frame_features.shape[1:]))
        times = frame_times.new_zeros((batch, max_len))
        valid = torch.zeros((batch, max_len), dtype=torch.bool, device=frame_features.device)
        for b, (start, end) in enumerate(segments):
            feats[b, : end - start] = frame_features[start:end]
            times[b, : end - start] = frame_times[start:end]
            valid[b, : end - start] = True
        return feats, times, valid

    def _attend_group(
        self,
        queries: torch.Tensor,
        frame_features: torch.Tensor,
        segments: Sequence[tuple[int, int]],
        frame_times: torch.Tensor,
    ) -> torch.Tensor:
        feats, times, valid = self._pack(frame_features, segments, frame_times)
        batch, n = times.shape
        x = self.ln_kv(self.kv_proj(feats.reshape(batch, n * TOKENS_PER_FRAME, -1)))
        keys = add_pos_embed_3d(x, times)  # positions go into the keys only
        mask = None if valid is None else valid.repeat_interleave(TOKENS_PER_FRAME, dim=1)
        return self.attn(queries, keys, x, mask)

    def forward(
        self,
        frame_features: torch.Tensor,
        segments: Sequence[tuple[int, int]],
        frame_times: torch.Tensor,
    ) -> torch.Tensor:
        """frame_features (T, 576, Dv); segments: [start, end) frame ranges; frame_times (T,) temporal index
        of every frame (absolute frame index for video, 0 for image views). Returns (len(segments), Q, D)."""
        queries = self.ln_q(self.query)
        out = queries.new_empty((len(segments), *queries.shape))
        max_frames = max(1, self.max_tokens_per_call // TOKENS_PER_FRAME)
        for group in plan_segment_groups([e - s for s, e in segments], max_frames):
            index = torch.tensor(group, device=out.device)
            out[index] = self._attend_group(queries, frame_features, [segments[i] for i in group], frame_times)
        return self.ln_post(out) @ self.proj


# --------------------------------------------------------------------------------------------------------------
# Thumbnail
# --------------------------------------------------------------------------------------------------------------


class ThumbnailProjector(nn.Module):
    """Mean of the cube-start frames, averaged over runs of consecutive raster tokens, then one Linear."""

    def __init__(self, vision_dim: int, dim: int, num_queries: int) -> None:
        super().__init__()
        if TOKENS_PER_FRAME % num_queries:
            raise ValueError(f"num_queries {num_queries} must divide {TOKENS_PER_FRAME}")
        self.pool = TOKENS_PER_FRAME // num_queries  # 9 for 64 queries; runs of tokens, not 3x3 patches
        self.proj = nn.Linear(vision_dim, dim)

    def forward(self, frame_features: torch.Tensor, start_frames: Sequence[int]) -> torch.Tensor:
        index = torch.tensor(list(start_frames), device=frame_features.device)
        frame = frame_features.index_select(0, index).mean(dim=0)  # (576, Dv)
        pooled = frame.view(-1, self.pool, frame.shape[-1]).mean(dim=1)  # (Q, Dv)
        return self.proj(pooled)


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VideoEncoding:
    features: torch.Tensor  # (num_blocks, Q, D): [thumbnail?] + one block per cube
    frame_bounds: list[tuple[int, int]]  # per cube, half-open frame range
    z_logits: torch.Tensor  # (T-1, 2)
    y_prob: torch.Tensor  # (T-1,)
    has_thumbnail: bool

    @property
    def num_cubes(self) -> int:
        return len(self.frame_bounds)

    @property
    def start_frames(self) -> list[int]:
        return [start for start, _ in self.frame_bounds]

    @property
    def cube_features(self) -> torch.Tensor:
        return self.features[1:] if self.has_thumbnail else self.features


class QuicksviewerVisionEncoder(nn.Module):
    """pixel values -> visual feature blocks of shape (num_queries, LM hidden)."""

    def __init__(
        self,
        config: QuicksviewerConfig,
        max_vit_batch: int = DEFAULT_MAX_VIT_BATCH,
        max_resampler_tokens: int = DEFAULT_MAX_RESAMPLER_TOKENS,
    ) -> None:
        super().__init__()
        self.config = config
        vision_dim = config.vision_config.hidden_size
        dim = config.text_config.hidden_size
        self.vision_tower = SiglipVisionTower(config.vision_config, max_batch_size=max_vit_batch)
        self.cubing = MomentumCubing(vision_dim)
        self.resampler = PerceiverResampler(
            vision_dim, dim, config.num_queries, config.resampler_num_heads, max_resampler_tokens
        )
        self.thumbnail = ThumbnailProjector(vision_dim, dim, config.num_queries) if config.mm_use_thumbnail else None

    @torch.no_grad()
    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 576, Dv), all frames/views batched."""
        return self.vision_tower(pixel_values)

    @torch.no_grad()
    def encode_video_features(self, frame_features: torch.Tensor) -> VideoEncoding:
        """Cubing + resampler + thumbnail on precomputed (T, 576, Dv) tower features of one video."""
        cubing = self.cubing(frame_features)
        times = torch.arange(frame_features.shape[0], device=frame_features.device)
        blocks = self.resampler(frame_features, cubing.frame_bounds, times)
        if self.thumbnail is not None:
            thumb = self.thumbnail(frame_features, cubing.start_frames)
            blocks = torch.cat([thumb[None].to(blocks.dtype), blocks])
        return VideoEncoding(blocks, cubing.frame_bounds, cubing.z_logits, cubing.y_prob, self.thumbnail is not None)

    @torch.no_grad()
    def encode_video(self, pixel_values: torch.Tensor) -> VideoEncoding:
        """(T, 3, S, S) frames of one video -> VideoEncoding."""
        return self.encode_video_features(self.tower_features(pixel_values))

    @torch.no_grad()
    def warm_up(self, num_frames: int) -> None:
        """Encode ``num_frames`` blank frames as a video: the kernel choices and allocator growth
        of a full tower batch, which the first real video would pay otherwise (on an H100, a
        420-frame encode took 1.13 s after an 8-frame one, 0.68 s once warm)."""
        size = self.config.vision_config.image_size
        param = next(self.parameters())
        shape = (num_frames, 3, size, size)
        self.encode_video(torch.zeros(shape, dtype=param.dtype, device=param.device))

    @torch.no_grad()
    def encode_videos(self, videos: Sequence[torch.Tensor]) -> list[VideoEncoding]:
        """Several videos with one batched tower pass over all their frames."""
        if not videos:
            return []
        features = self.tower_features(torch.cat(list(videos)))
        counts = [video.shape[0] for video in videos]
        return [self.encode_video_features(f) for f in features.split(counts)]

    @torch.no_grad()
    def encode_image_features(self, view_features: torch.Tensor) -> torch.Tensor:
        """(N, 576, Dv) tower features of image views -> (N, Q, D); every view uses temporal index 0."""
        num_views = view_features.shape[0]
        segments = [(i, i + 1) for i in range(num_views)]
        times = torch.zeros(num_views, dtype=torch.long, device=view_features.device)
        return self.resampler(view_features, segments, times)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) image views -> (N, Q, D)."""
        return self.encode_image_features(self.tower_features(pixel_values))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Load vision weights given with original or cubeserve names; other (LM) weights are skipped.

        Returns the cubeserve names that were loaded. With ``strict`` every parameter must be loaded.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = original_to_cubeserve_name(name)
            if not target.startswith(VISION_PREFIXES) or target.startswith(UNUSED_VISION_PREFIXES):
                continue
            if target.startswith("thumbnail.") and self.thumbnail is None:
                continue
            param = params.get(target)
            if param is None:
                raise KeyError(f"unexpected vision weight {name!r} (as {target!r})")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(target)
        if strict:
            missing = sorted(set(params) - loaded)
            if missing:
                raise KeyError(f"vision weights missing from the checkpoint: {missing}")
        return loaded
