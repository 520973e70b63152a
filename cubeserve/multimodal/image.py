"""Pixel preprocessing of images and video frames, exactly as the original SigLIP pipeline.

Every resize is PIL bicubic on uint8 RGB; pixels are then scaled by ``rescale_factor`` in
float64, cast to float32 and normalised ``(x - mean) / std`` (mean = std = 0.5 for SigLIP).
Output layout is (N, 3, S, S) float32.

Public API
----------
``PixelNormalization(rescale_factor=1/255, mean=(0.5,)*3, std=(0.5,)*3)``
``normalize_pixels(images_u8, norm, dtype=torch.float32) -> torch.Tensor (N,3,H,W)``
    ``images_u8``: (N,H,W,3) uint8, a numpy array or a tensor on any device (the result stays
    there, so uint8 pixels can be uploaded and normalised on the GPU).
``resize_bicubic(image: PIL.Image.Image, size_wh) -> PIL.Image.Image``
``squash_frame(frame (H,W,3) uint8, image_size) -> (S,S,3) uint8``
``resize_frames(frames (T,H,W,3) uint8, image_size) -> (T,S,S,3) uint8``
    Each frame is squashed to S x S (no aspect-ratio preservation, no padding).
``media_thread_pool() -> ThreadPoolExecutor``
    The process-wide pool for GIL-releasing media work (PyAV decoding, PIL resizing).
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


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@functools.cache
def media_thread_pool() -> ThreadPoolExecutor:
    """One pool per process, so concurrent requests share the CPUs instead of each starting
    its own threads; tasks run in submission order, which favours the oldest request."""
    return ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="cubeserve-media")


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
    images_u8: np.ndarray | torch.Tensor,
    norm: PixelNormalization = PixelNormalization(),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) on the input's device, cast to ``dtype`` at the end.

    The float32 values are bit-identical to the HF image processor's
    ``float32(float64(x) * rescale_factor)`` followed by ``(x - mean) / std`` in float32, on
    any device (IEEE float32 division and subtraction round the same everywhere).
    """
    pixels = torch.from_numpy(images_u8) if isinstance(images_u8, np.ndarray) else images_u8
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N,H,W,3), got {pixels.dtype} {tuple(pixels.shape)}")
    chw = pixels.permute(0, 3, 1, 2)
    divisor = _exact_float32_divisor(norm)
    if divisor is not None:
        mean = torch.tensor(norm.mean, dtype=torch.float32, device=chw.device).view(1, 3, 1, 1)
        std = torch.tensor(norm.std, dtype=torch.float32, device=chw.device).view(1, 3, 1, 1)
        out = chw.to(torch.float32, memory_format=torch.contiguous_format)
        return out.div_(divisor).sub_(mean).div_(std).to(dtype)
    # The result depends only on (channel, value): gather from a 3x256 table.
    table = torch.from_numpy(_normalization_table(norm)).to(chw.device)
    out = torch.empty(chw.shape, dtype=torch.float32, device=chw.device)
    for channel in range(3):
        out[:, channel] = table[channel][chw[:, channel].long()]
    return out.to(dtype)


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


def squash_frame(frame: np.ndarray, image_size: int) -> np.ndarray:
    """(H,W,3) uint8 -> (S,S,3) uint8, bicubic (PIL releases the GIL while resizing)."""
    return np.asarray(resize_bicubic(Image.fromarray(frame), (image_size, image_size)))


def resize_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(T,H,W,3) uint8 -> (T,S,S,3) uint8, each frame squashed to S x S (bicubic); long videos
    resize on ``media_thread_pool()``."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (image_size, image_size):
        return frames
    if len(frames) < _PARALLEL_MIN_FRAMES:
        return np.stack([squash_frame(f, image_size) for f in frames])
    return np.stack(list(media_thread_pool().map(lambda f: squash_frame(f, image_size), frames)))


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
