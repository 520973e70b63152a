"""Quicksviewer vision encoding of one video on the device: cubeserve's stages vs. HF SigLIP.

The run builds the vision encoder of the chosen shape with random weights (nothing is
downloaded), feeds it ``--frames`` random 384-px uint8 frames, and times (median of
``--repeats``, after a warm-up):

* ``cubeserve``: uploading and normalising the uint8 frames, the SigLIP tower (with the 24x24
  token-grid resize), cubing, the batched resampler, the thumbnail, and the whole encode;
* ``hf``: HF transformers' SigLIP vision model with the same weights over all frames in one
  call keeping every layer's output (the original's LLaVA-style call), then the original's
  ``F.interpolate`` resize of the token grid.
  The largest difference between the two towers' features is reported too.

One JSON line is printed (and appended to ``<results-dir>/vision.jsonl`` with ``--save``)::

    python -m cubeserve.bench.vision --save
    python -m cubeserve.bench.vision --model-shape tiny-384 --device cpu --frames 16   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cubeserve.bench.common import add_common_args, environment, ratio
from cubeserve.bench.video import (
    MODEL_SHAPES,
    free_memory,
    hf_siglip_with_weights_of,
    original_style_features,
    run_in_scratch_dir,
    timed,
    write_checkpoint,
)
from cubeserve.configs.quicksviewer import load_quicksviewer_config
from cubeserve.engine.model_runner import resolve_device, resolve_dtype
from cubeserve.models.quicksviewer_vision import QuicksviewerVisionEncoder
from cubeserve.models.weights import load_model
from cubeserve.multimodal.image import normalize_pixels
from cubeserve.multimodal.processors.quicksviewer import QuicksviewerProcessorConfig
from cubeserve.server_args import ServerArgs
from cubeserve.utils import to_device


def median_seconds(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    return statistics.median(timed(device, fn)[0] for _ in range(repeats))


def milliseconds(seconds: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(1000 * v, 2) for k, v in seconds.items()}


def tower_flops_per_frame(vision_config) -> float:
    """Matmul FLOPs of one frame through the SigLIP tower: patch embedding, then per layer the
    q/k/v/out projections, the two MLP matmuls and attention's two (tokens x tokens) products."""
    dim, inner = vision_config.hidden_size, vision_config.intermediate_size
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    patch = 2 * tokens * vision_config.num_channels * vision_config.patch_size**2 * dim
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * inner) + 4 * tokens * tokens * dim
    return patch + vision_config.num_hidden_layers * per_layer


def measure(args: argparse.Namespace, server_args: ServerArgs, work: Path) -> dict[str, Any]:
    model_dir = write_checkpoint(work / "model", MODEL_SHAPES[args.model_shape])
    config = load_quicksviewer_config(model_dir)
    device = resolve_device(server_args.device)
    dtype = resolve_dtype(server_args.dtype, config, device)
    encoder = load_model(QuicksviewerVisionEncoder, config, None, dtype, device, "dummy")
    normalization = QuicksviewerProcessorConfig.from_model_dir(model_dir, None).normalization
    size = config.vision_config.image_size
    rng = np.random.default_rng(args.seed)
    frames = torch.from_numpy(rng.integers(0, 256, (args.frames, size, size, 3), dtype=np.uint8))

    def upload() -> torch.Tensor:
        return normalize_pixels(to_device(frames, torch.uint8, device), normalization, dtype)

    def seconds(fn: Callable[[], Any]) -> float:
        return median_seconds(device, fn, args.repeats)

    with torch.inference_mode():
        pixels = upload()
        features = encoder.tower_features(pixels)
        cubing = encoder.cubing(features)
        times = torch.arange(args.frames, device=device)
        ours = {
            "upload_normalize": seconds(upload),
            "tower": seconds(lambda: encoder.tower_features(pixels)),
            "cubing": seconds(lambda: encoder.cubing(features)),
            "resampler": seconds(lambda: encoder.resampler(features, cubing.frame_bounds, times)),
            "thumbnail": seconds(lambda: encoder.thumbnail(features, cubing.start_frames))
            if encoder.thumbnail is not None
            else None,
            "encode_video": seconds(lambda: encoder.encode_video(pixels)),
        }
        theirs, max_abs_diff = None, None
        if not args.skip_hf:
            hf_tower = hf_siglip_with_weights_of(encoder, config, dtype, device)
            grid = size // config.vision_config.patch_size

            def hf_features() -> torch.Tensor:
                return original_style_features(hf_tower, pixels, grid)

            theirs = {"tower": seconds(hf_features)}
            max_abs_diff = (hf_features().float() - features.float()).abs().max().item()
            del hf_tower
            free_memory()
    return {
        "bench": "vision",
        "run_name": args.run_name,
        "model_shape": args.model_shape,
        "dtype": str(dtype).removeprefix("torch."),
        "frames": args.frames,
        "num_cubes": len(cubing.frame_bounds),
        "tower_tflop_per_s": round(
            args.frames * tower_flops_per_frame(config.vision_config) / ours["tower"] / 1e12, 2
        ),
        "cubeserve_ms": milliseconds(ours),
        "hf_ms": None if theirs is None else milliseconds(theirs),
        "speedup_vs_hf": None
        if theirs is None
        else {"tower": ratio(theirs["tower"], ours["tower"])},
        "tower_max_abs_diff_vs_hf": max_abs_diff,
        "env": environment(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.set_defaults(load_format="dummy")
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="quicksviewer-7b")
    parser.add_argument("--frames", type=int, default=420)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_in_scratch_dir("vision", parse_args(argv), measure)


if __name__ == "__main__":
    main()
