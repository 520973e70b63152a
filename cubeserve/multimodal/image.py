"""Pixel preprocessing of images and video frames, exactly as the original SigLIP pipeline.

Every resize is PIL bicubic on uint8 RGB; pixels are then scaled by ``rescale_factor`` in
float64, cast to float32 and normalised ``(x - mean) / std`` (mean = std = 0.5 for SigLIP).
Output layout is (N, 3, S, S) float32.

Public API
----------
``PixelNormalization(rescale_factor=1/255, mean=(0.5,)*3, std=(0.5,)*3)``
``normalize_pixels(images_u8: np.ndarray (N,H,W,3) uint8, norm) -> torch.Tensor (N,3,H,W) float32``
``resize_bicubic(image: PIL.Image.Image, size_wh) -> PIL.Image.Image``
``preprocess_video_frames(frames (T,H,W,3) uint8, image_size, norm=..., num_threads=None)``
    -> Tensor (T,3,S,S); ``resize_frames(frames, image_size)`` -> (T,S,S,3) uint8.
    Each frame is squashed to S x S (no aspect-ratio preservation, no padding).
``parse_grid_pinpoints(value: str | Sequence) -> list[tuple[int, int]]``
    A Python-literal string "[(w, h), ...]" or a JSON string / list of [w, h] pairs.
``select_best_resolution(size_wh, candidates) -> (w, h)``
``resize_and_pad(image, target_wh) -> PIL.Image.Image``  (fit, centred on a black canvas)
``split_into_tiles(canvas_u8: np.ndarray (H,W,3), tile) -> np.ndarray (n,tile,tile,3)``
    Row-major tiles stepping by ``tile``; the part of a tile past the canvas is black.
``anyres_views(image, image_size, pinpoints) -> np.ndarray (views,S,S,3) uint8``
    ``[image squashed to S x S] + tiles of the best-fitting padded canvas``.
``preprocess_anyres_image(image, image_size, pinpoints, norm=...) -> Tensor (views,3,S,S)``
``num_anyres_views(size_wh, image_size, pinpoints) -> int``  (without touching pixels)
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_BICUBIC = Image.Resampling.BICUBIC
# Below this many frames a thread pool costs more than it saves.
_PARALLEL_MIN_FRAMES = 16


@dataclass(frozen=True)
class PixelNormalization:
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_preprocessor_config(cls, config: dict) -> PixelNormalization:
        return cls(
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            mean=tuple(float(v) for v in config.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(v) for v in config.get("image_std", (0.5, 0.5, 0.5))),
        )


def normalize_pixels(
    images_u8: np.ndarray, norm: PixelNormalization = PixelNormalization()
) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32, bit-identical to the HF image processor's
    ``float32(float64(x) * rescale_factor)`` followed by ``(x - mean) / std`` in float32."""
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N,H,W,3), got {images_u8.dtype} {images_u8.shape}")
    chw = torch.from_numpy(images_u8).permute(0, 3, 1, 2)
    divisor = _exact_float32_divisor(norm)
    if divisor is not None:
        mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        out = chw.to(torch.float32, memory_format=torch.contiguous_format)
        return out.div_(divisor).sub_(mean).div_(std)
    # The result depends only on (channel, value): gather from a 3x256 table.
    table = torch.from_numpy(_normalization_table(norm))
    out = torch.empty(chw.shape, dtype=torch.float32)
    for channel in range(3):
        out[:, channel] = table[channel][chw[:, channel].long()]
    return out


def _normalization_table(norm: PixelNormalization) -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)[:, None]
    scaled = (values.astype(np.float64) * norm.rescale_factor).astype(np.float32)
    table = (scaled - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    return np.ascontiguousarray(table.T)  # (3, 256)


@functools.lru_cache(maxsize=8)
def _exact_float32_divisor(norm: PixelNormalization) -> float | None:
    """``d`` when float32 ``(x / d - mean) / std`` equals the reference table for all 256 values
    (true for rescale_factor = 1/255), which is ~10x faster than a table gather."""
    divisor = round(1 / norm.rescale_factor)
    values = torch.arange(256, dtype=torch.float32).view(1, 256).expand(3, 256)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1)
    fast = (values / float(divisor) - mean) / std
    return float(divisor) if np.array_equal(fast.numpy(), _normalization_table(norm)) else None


def resize_bicubic(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    return image.resize(size_wh, resample=_BICUBIC)


def _squash(frame: np.ndarray, image_size: int) -> np.ndarray:
    return np.asarray(resize_bicubic(Image.fromarray(frame), (image_size, image_size)))


def preprocess_video_frames(
    frames: np.ndarray,
    image_size: int,
    norm: PixelNormalization = PixelNormalization(),
    num_threads: int | None = None,
) -> torch.Tensor:
    """(T,H,W,3) uint8 RGB -> (T,3,S,S) float32.

    PIL releases the GIL while resizing, so long videos resize on a thread pool.
    """
    squashed = resize_frames(frames, image_size, num_threads=num_threads)
    return normalize_pixels(squashed, norm)


def resize_frames(
    frames: np.ndarray, image_size: int, num_threads: int | None = None
) -> np.ndarray:
    """(T,H,W,3) uint8 -> (T,S,S,3) uint8, each frame squashed to S x S (bicubic)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (image_size, image_size):
        return frames
    workers = num_threads or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(frames) < _PARALLEL_MIN_FRAMES:
        return np.stack([_squash(f, image_size) for f in frames])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(lambda f: _squash(f, image_size), frames)))


# --------------------------------------------------------------------------- anyres


def parse_grid_pinpoints(value: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = ast.literal_eval(value)
    pinpoints = [(int(w), int(h)) for w, h in value]
    if not pinpoints or any(w <= 0 or h <= 0 for w, h in pinpoints):
        raise ValueError(f"invalid image_grid_pinpoints: {value!r}")
    return pinpoints


def select_best_resolution(
    size_wh: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """Most effective resolution kept after fitting; ties go to less wasted area, then order."""
    width, height = size_wh
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    if best is None:
        raise ValueError("no usable grid pinpoint")
    return best


def _fit_size(size_wh: tuple[int, int], target_wh: tuple[int, int]) -> tuple[int, int]:
    (width, height), (target_w, target_h) = size_wh, target_wh
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def resize_and_pad(image: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    new_w, new_h = _fit_size(image.size, target_wh)
    canvas = Image.new("RGB", target_wh, (0, 0, 0))
    canvas.paste(
        resize_bicubic(image, (new_w, new_h)),
        ((target_wh[0] - new_w) // 2, (target_wh[1] - new_h) // 2),
    )
    return canvas


def split_into_tiles(canvas: np.ndarray, tile: int) -> np.ndarray:
    height, width = canvas.shape[:2]
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    padded = np.zeros((rows * tile, cols * tile, 3), dtype=canvas.dtype)
    padded[:height, :width] = canvas
    return (
        padded.reshape(rows, tile, cols, tile, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(-1, tile, tile, 3)
    )


def anyres_views(
    image: Image.Image, image_size: int, pinpoints: Sequence[tuple[int, int]]
) -> np.ndarray:
    canvas = resize_and_pad(image, select_best_resolution(image.size, pinpoints))
    base = np.asarray(resize_bicubic(image, (image_size, image_size)))
    return np.concatenate([base[None], split_into_tiles(np.asarray(canvas), image_size)])


def num_anyres_views(
    size_wh: tuple[int, int], image_size: int, pinpoints: Sequence[tuple[int, int]]
) -> int:
    width, height = select_best_resolution(size_wh, pinpoints)
    return 1 + math.ceil(width / image_size) * math.ceil(height / image_size)


def preprocess_anyres_image(
    image: Image.Image,
    image_size: int,
    pinpoints: Sequence[tuple[int, int]],
    norm: PixelNormalization = PixelNormalization(),
) -> torch.Tensor:
    return normalize_pixels(anyres_views(image, image_size, pinpoints), norm)


def preprocess_square_image(
    image: Image.Image, image_size: int, norm: PixelNormalization = PixelNormalization()
) -> torch.Tensor:
    """One view: the image squashed to S x S (used when image_aspect_ratio is not anyres)."""
    return normalize_pixels(np.asarray(resize_bicubic(image, (image_size, image_size)))[None], norm)
