"""Video time-to-first-token of Quicksviewer serving: cubeserve vs. the original's request path.

The reference workload is one 420-frame request on a local 7-minute 1280x720 30 fps H.264 file.
The run writes its own test videos (PyAV), a Quicksviewer checkpoint directory of the chosen
shape with random weights (``--load-format dummy``: nothing is downloaded), and measures:

* ``cubeserve``: end-to-end TTFT of the first turn (engine API, ``max_new_tokens=1``), its
  breakdown (decoding alone; decoding + resizing + hashing as the frontend runs them; vision
  encoding on the device; prefill, timed as a text prompt of the same length), the second
  turn's TTFT on the same video (media, encoder and prefix caches), the inter-token gaps of
  ``--itl-streams`` text streams before and while another video of that length arrives (its
  vision encoding runs one tower batch per engine step between their forwards), and
  ``--concurrency`` different videos sent at once (videos/min, p50/p90 TTFT);
* ``baseline``, the original's path in this process with the same shapes: sequential decoding
  of every frame with an RGB conversion each (OpenCV's read loop; timed on the first
  ``--baseline-decode-seconds`` and scaled to the whole file), per-frame PIL resize and numpy
  normalisation (the HF SigLIP image processor), one HF SigLIP call over all frames, cubing,
  the resampler cube by cube, the thumbnail, and the HF LM prefill. Its TTFT is the stages'
  sum; for the concurrent videos it serves one request at a time, as the original does
  (modelled from one measured request).

One JSON line is printed (and appended to ``<results-dir>/video.jsonl`` with ``--save``);
progress goes to stderr. Full size, on one GPU (models are initialised on it directly)::

    python -m cubeserve.bench.video --save

CPU smoke run::

    python -m cubeserve.bench.video --model-shape tiny --device cpu --video-seconds 6 \\
        --width 64 --height 48 --concurrency 2 --concurrent-seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import io
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoModel

import cubeserve
from cubeserve.bench import itl
from cubeserve.bench.common import (
    HFModel,
    add_common_args,
    emit,
    environment,
    random_prompts,
    ratio,
)
from cubeserve.bench.serving import summarize
from cubeserve.configs.quicksviewer import (
    MM_SPECIAL_TOKENS,
    QuicksviewerConfig,
    load_quicksviewer_config,
)
from cubeserve.demo import ENDOFTEXT, IM_END, write_demo_tokenizer
from cubeserve.engine.model_runner import resolve_device, resolve_dtype
from cubeserve.models.quicksviewer_vision import QuicksviewerVisionEncoder, VideoEncoding
from cubeserve.models.siglip import FEATURE_GRID
from cubeserve.models.weights import load_model
from cubeserve.multimodal.image import PixelNormalization, available_cpus
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    MediaItem,
    ProcessedRequest,
    QuicksviewerProcessor,
)
from cubeserve.multimodal.video import probe_video, read_video
from cubeserve.server_args import ServerArgs

T = TypeVar("T")
_START = time.perf_counter()


def log(message: str) -> None:
    print(
        f"[video bench {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True
    )


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    text: dict[str, Any]  # Qwen2 config fields; vocab_size None: the tokenizer's size
    vision: dict[str, Any]  # SigLIP vision config fields
    resampler_heads: int
    dtype: str  # what the checkpoint names (the engine's ``--dtype auto`` uses it on CUDA)


MODEL_SHAPES = {
    # Qwen2.5-7B + SigLIP-so400m-patch14-384, as Quicksviewer-7B.
    "quicksviewer-7b": ModelShape(
        text={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
        },
        vision={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        resampler_heads=28,
        dtype="bfloat16",
    ),
    "tiny": ModelShape(
        text={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": None,
            "max_position_embeddings": 8192,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
        },
        vision={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        resampler_heads=4,
        dtype="float32",
    ),
}
# The tiny model fed frames of Quicksviewer-7B's size (384 px): the real model's media traffic
# (decoding, resizing, ~0.44 MB of pixels per frame between processes) on any machine.
MODEL_SHAPES["tiny-384"] = dataclasses.replace(
    MODEL_SHAPES["tiny"], vision={**MODEL_SHAPES["tiny"].vision, "image_size": 384}
)


def write_checkpoint(directory: Path, shape: ModelShape) -> Path:
    """An original-format Quicksviewer checkpoint without weights (``--load-format dummy``):
    config.json with the ``mm_*`` fields, the SigLIP folder's config and preprocessor config,
    a locally trained tokenizer holding the multimodal tokens, and generation_config.json."""
    directory.mkdir(parents=True)
    tokenizer = write_demo_tokenizer(
        directory, extra_special_tokens=[text for _, text, _ in MM_SPECIAL_TOKENS]
    )
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    ids = {"bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext}
    size = shape.vision["image_size"]
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "quicksviewer_qwen",
        **shape.text,
        "vocab_size": shape.text["vocab_size"] or len(tokenizer),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "torch_dtype": shape.dtype,
        **ids,
        "mm_vision_tower": "siglip_vision",
        "mm_projector_type": "identity",
        "mm_resampler_type": "qformer",
        "mm_cubing": "momentum",
        "is_cubing": True,
        "num_queries": 64,
        "num_heads": shape.resampler_heads,
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
        **{flag: True for _, _, flag in MM_SPECIAL_TOKENS},
        "mm_use_thumbnail": True,
    }
    tower = directory / "siglip_vision"
    tower.mkdir()
    vision_config = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        **shape.vision,
    }
    preprocessor = {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": size, "width": size},
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    for path, content in [
        (directory / "config.json", config),
        (directory / "generation_config.json", ids),
        (tower / "config.json", vision_config),
        (tower / "preprocessor_config.json", preprocessor),
    ]:
        path.write_text(json.dumps(content, indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------- test videos


@dataclass(frozen=True)
class VideoSpec:
    width: int
    height: int
    fps: int
    gop: int  # frames per closed GOP (keyframe interval)


class LoopedVideo:
    """A stretch of synthetic video (a panning random-block texture) encoded once - H.264 with
    B-frames through libx264, else MPEG-4 Part 2 - and written out as files of any length by
    repeating its GOPs with shifted timestamps.

    Every GOP is closed, so any GOP can start a file and every frame of the result decodes like
    one of a real recording of that length; but a 7-minute file takes a second to write instead
    of minutes of encoding. Files starting at different GOPs are different videos.
    """

    def __init__(self, spec: VideoSpec, num_gops: int, seed: int) -> None:
        self.spec = spec
        self.data = self._encode(spec, num_gops, seed)
        with av.open(io.BytesIO(self.data)) as source:
            stream = source.streams.video[0]
            self.codec = stream.codec_context.name
            self.frame_ticks = round(1 / (spec.fps * stream.time_base))
            packets = [
                (bytes(p), p.pts, p.dts, p.is_keyframe) for p in source.demux(stream) if p.size
            ]
        self.gops: list[list[tuple[bytes, int, int, bool]]] = []
        for packet in packets:
            if packet[3] or not self.gops:
                self.gops.append([])
            self.gops[-1].append(packet)
        if len(self.gops) != num_gops:
            raise RuntimeError(f"the encoder wrote {len(self.gops)} GOPs, not {num_gops}")

    @staticmethod
    def _encode(spec: VideoSpec, num_gops: int, seed: int) -> bytes:
        target = io.BytesIO()
        with av.open(target, "w", format="mp4") as container:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=spec.fps)
            stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
            stream.codec_context.gop_size = spec.gop
            if codec == "libx264":
                gop = str(spec.gop)
                # Closed GOPs (x264's default) of exactly ``gop`` frames, with B-frames.
                stream.options = {
                    "preset": "veryfast",
                    "g": gop,
                    "keyint_min": gop,
                    "sc_threshold": "0",
                    "bf": "2",
                }
            for frame in _panning_texture(spec, num_gops * spec.gop, seed):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        return target.getvalue()

    def write(self, path: Path, seconds: float, first_gop: int = 0) -> Path:
        """``seconds`` of video (whole GOPs) starting with GOP ``first_gop`` of the stretch."""
        gop_ticks = self.spec.gop * self.frame_ticks
        num_gops = max(1, round(seconds * self.spec.fps / self.spec.gop))
        with (
            av.open(io.BytesIO(self.data)) as source,
            av.open(str(path), "w", format="mp4") as out,
        ):
            template = source.streams.video[0]
            stream = out.add_stream_from_template(template)
            for position in range(num_gops):
                index = (first_gop + position) % len(self.gops)
                shift = (position - index) * gop_ticks
                for data, pts, dts, key in self.gops[index]:
                    packet = av.Packet(data)
                    packet.stream, packet.time_base = stream, template.time_base
                    packet.pts, packet.dts, packet.is_keyframe = pts + shift, dts + shift, key
                    out.mux(packet)
        return path


def _panning_texture(spec: VideoSpec, num_frames: int, seed: int) -> Iterator[np.ndarray]:
    block, travel = 8, 512
    rng = np.random.default_rng(seed)
    rows, cols = (spec.height + travel) // block + 1, (spec.width + travel) // block + 1
    canvas = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    canvas = canvas.repeat(block, axis=0).repeat(block, axis=1)
    for i in range(num_frames):
        dy, dx = (3 * i) % travel, (5 * i) % travel
        yield np.ascontiguousarray(canvas[dy : dy + spec.height, dx : dx + spec.width])


# --------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[float, T]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def rounded(values: dict[str, float | None], digits: int = 4) -> dict[str, float | None]:
    return {k: None if v is None else round(v, digits) for k, v in values.items()}


def free_memory() -> None:
    """Return what Python no longer references to the device (the engine's KV pool is sized from
    the free memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def video_message(path: Path, args: argparse.Namespace, question: str) -> dict[str, Any]:
    video = {"url": f"file://{path}", "fps": args.sample_fps, "max_frames": args.max_frames}
    return {
        "role": "user",
        "content": [{"type": "video_url", "video_url": video}, {"type": "text", "text": question}],
    }


# --------------------------------------------------------------------------- original's path


def original_style_decode_seconds(path: Path, limit_seconds: float) -> tuple[float, int]:
    """Seconds per frame of OpenCV-style decoding (every frame decoded and converted to RGB,
    FFmpeg's own threads on), measured on the first ``limit_seconds``; and the frames timed."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        limit = max(1, round(limit_seconds * float(stream.average_rate)))
        start = time.perf_counter()
        count = 0
        for count, frame in enumerate(container.decode(stream), start=1):
            frame.to_ndarray(format="rgb24")
            if count >= limit:
                break
        return (time.perf_counter() - start) / count, count


def original_style_preprocess(
    frames: np.ndarray, size: int, norm: PixelNormalization
) -> torch.Tensor:
    """The HF SigLIP image processor, frame by frame: PIL bicubic resize, float64 rescale,
    float32 normalisation, HWC -> CHW."""
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    views = []
    for frame in frames:
        resized = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC))
        scaled = (resized.astype(np.float64) * norm.rescale_factor).astype(np.float32)
        views.append(((scaled - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(views))


def interpolate_token_grid(
    tokens: torch.Tensor, grid: int, target: int = FEATURE_GRID
) -> torch.Tensor:
    """The original's resize of (N, grid*grid, D) tokens: ``F.interpolate`` on (N, D, g, g)."""
    if grid == target:
        return tokens
    n, _, dim = tokens.shape
    maps = tokens.transpose(1, 2).reshape(n, dim, grid, grid)
    maps = F.interpolate(maps, size=(target, target), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2).contiguous()


def original_style_features(tower: nn.Module, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """The original's LLaVA-style call of HF SigLIP: every layer's output kept, the last one
    (before the post-layernorm) used, resized to the 24x24 grid."""
    out = tower(pixel_values=pixels, output_hidden_states=True)
    return interpolate_token_grid(out.hidden_states[-1], grid)


def hf_siglip_with_weights_of(
    encoder: QuicksviewerVisionEncoder,
    config: QuicksviewerConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """HF's SigLIP vision model holding the same tower weights (the names match up to the
    ``vision_model.`` prefix; the post-layernorm and pooling head, which Quicksviewer does not
    use, keep their random values)."""
    with device:
        tower = AutoModel.from_config(config.vision_config, dtype=dtype).eval()
    weights = encoder.vision_tower.state_dict()
    if not any(name.startswith("vision_model.") for name in tower.state_dict()):
        weights = {name.removeprefix("vision_model."): t for name, t in weights.items()}
    missing, unexpected = tower.load_state_dict(weights, strict=False)
    unused = ("post_layernorm", "head", "vision_model.post_layernorm", "vision_model.head")
    if unexpected or any(not name.startswith(unused) for name in missing):
        raise RuntimeError(f"tower weights do not map onto HF SigLIP: {missing=} {unexpected=}")
    return tower


class OriginalStyleModel:
    """The original's model path at full size with random weights: HF SigLIP (holding the
    encoder's tower weights) over all frames in one call, cubing, the resampler one cube at a
    time, the thumbnail, and the HF LM's prefill on the assembled embeddings. Cubing, resampler
    and thumbnail are cubeserve's modules (the same math); only their call pattern is the
    original's."""

    def __init__(
        self,
        config: QuicksviewerConfig,
        server_args: ServerArgs,
        encoder: QuicksviewerVisionEncoder,
    ) -> None:
        self.device = resolve_device(server_args.device)
        self.dtype = resolve_dtype(server_args.dtype, config, self.device)
        self.encoder = encoder
        self.tower = hf_siglip_with_weights_of(encoder, config, self.dtype, self.device)
        self.grid = config.vision_config.image_size // config.vision_config.patch_size
        self.lm = HFModel(server_args, config)

    @torch.inference_mode()
    def encode_video(self, pixel_values: torch.Tensor) -> VideoEncoding:
        pixels = pixel_values.to(self.device, self.dtype)
        features = original_style_features(self.tower, pixels, self.grid)
        cubing = self.encoder.cubing(features)
        times = torch.arange(features.shape[0], device=self.device)
        cubes = [
            self.encoder.resampler(features, [bounds], times) for bounds in cubing.frame_bounds
        ]
        thumbnail = self.encoder.thumbnail(features, cubing.start_frames)
        blocks = torch.cat([thumbnail[None].to(cubes[0].dtype), *cubes])
        return VideoEncoding(blocks, cubing.frame_bounds, cubing.z_logits, cubing.y_prob, True)

    @torch.inference_mode()
    def prefill(self, merged_ids: list[int], blocks: torch.Tensor) -> torch.Tensor:
        embeds = assemble_embeddings(self.lm.model.get_input_embeddings(), merged_ids, blocks)
        return self.lm.model(inputs_embeds=embeds[None], logits_to_keep=1).logits

    def close(self) -> None:
        self.lm.close()
        del self.tower
        free_memory()


def assemble_embeddings(
    embed: nn.Module, merged_ids: list[int], blocks: torch.Tensor
) -> torch.Tensor:
    """The original's inputs_embeds: text ids embedded, the k-th placeholder replaced by the
    k-th visual block."""

    def text(ids: list[int]) -> torch.Tensor:
        return embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))

    pieces, start = [], 0
    placeholders = [i for i, t in enumerate(merged_ids) if t == IMAGE_PLACEHOLDER_ID]
    for block, position in zip(blocks, placeholders, strict=True):
        pieces += [text(merged_ids[start:position]), block]
        start = position + 1
    pieces.append(text(merged_ids[start:]))
    return torch.cat([piece.to(embed.weight.dtype) for piece in pieces])


def measure_baseline(
    model: OriginalStyleModel,
    frames: np.ndarray,
    processed: ProcessedRequest,
    decode_seconds: float,
    size: int,
    norm: PixelNormalization,
) -> dict[str, float]:
    """Stage seconds of one request on the original's path (decoding measured by the caller)."""
    preprocess_s, pixels = timed(
        model.device, lambda: original_style_preprocess(frames, size, norm)
    )
    vision_s, video = timed(model.device, lambda: model.encode_video(pixels))
    merged_ids = processed.merge_cubes([video.frame_bounds])
    prefill_s, _ = timed(model.device, lambda: model.prefill(merged_ids, video.features))
    stages = {
        "decode": decode_seconds,
        "preprocess": preprocess_s,
        "vision": vision_s,
        "prefill": prefill_s,
    }
    return {"ttft_s": sum(stages.values()), "breakdown_s": stages}


# --------------------------------------------------------------------------- cubeserve


def encode_on_device(encoder: QuicksviewerVisionEncoder, item: MediaItem) -> VideoEncoding:
    """What the engine's encode stage does for a video: upload the uint8 pixels and normalise
    them one tower batch at a time, run the tower on each, then cube and resample."""
    param = next(encoder.parameters())
    batch, num_views = encoder.vision_tower.max_batch_size, len(item.take_pixels())
    features = [
        encoder.tower_features(item.pixel_values_on(param.device, param.dtype, slice(i, i + batch)))
        for i in range(0, num_views, batch)
    ]
    return encoder.encode_video_features(torch.cat(features))


def first_token(engine: cubeserve.Engine, **request: Any) -> tuple[float, dict[str, Any]]:
    """Seconds until the one requested token is back, and the result."""
    params = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    result = engine.generate(sampling_params=params, **request)
    return time.perf_counter() - start, result


def measure_concurrency(
    engine: cubeserve.Engine, paths: Sequence[Path], args: argparse.Namespace
) -> dict[str, float]:
    """All videos at once; each request's TTFT is the arrival of its first streamed token."""
    conversations = [[video_message(p, args, "What happens in this video?")] for p in paths]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    ttfts: dict[int, float] = {}
    for chunk in engine.generate(messages=conversations, sampling_params=params, stream=True):
        ttfts.setdefault(chunk["index"], time.perf_counter() - start)
    wall = time.perf_counter() - start
    return serving_summary(list(ttfts.values()), wall)


async def streams_while_video_arrives(
    engine: cubeserve.Engine, path: Path, args: argparse.Namespace, vocab_size: int
) -> dict[str, Any]:
    """``--itl-streams`` text streams decode while a video the engine has not seen arrives:
    their inter-token gaps before it, and from its arrival to its first token (decoding in
    the frontend, vision encoding one tower batch per engine step between the streams'
    forwards, prefill)."""
    prompts = random_prompts(random.Random(args.seed), [64] * args.itl_streams, range(vocab_size))

    def video_request() -> Awaitable[dict[str, Any]]:
        return engine.async_generate(
            messages=[video_message(path, args, "Describe what happens.")],
            sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
        )

    _, window, _ = await itl.streams_around(
        engine, prompts, args.itl_stream_tokens, args.itl_baseline_seconds, video_request
    )
    return {
        "streams": args.itl_streams,
        "video_ttft_s": round(window.end - window.start, 4),
        "itl_before_ms": rounded(summarize(window.before), 2),
        "itl_during_ms": rounded(summarize(window.during), 2),
    }


def serving_summary(ttfts: Sequence[float], wall_seconds: float) -> dict[str, float]:
    return {
        "wall_s": round(wall_seconds, 4),
        "videos_per_min": round(60 * len(ttfts) / wall_seconds, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p90_s": round(percentile(ttfts, 90), 4),
    }


def one_at_a_time(seconds_per_request: float, num_requests: int) -> dict[str, float]:
    """Requests arriving together and served one after the other: the i-th waits for i."""
    ttfts = [(i + 1) * seconds_per_request for i in range(num_requests)]
    return serving_summary(ttfts, ttfts[-1])


# --------------------------------------------------------------------------- the run


@dataclass
class BenchVideos:
    main: Path  # the TTFT video
    fresh: Path | None  # as long as ``main``, other frames: sent while text streams decode
    warmup: Path
    concurrent: list[Path]
    codec: str


def write_videos(args: argparse.Namespace, directory: Path) -> BenchVideos:
    spec = VideoSpec(args.width, args.height, args.video_fps, args.gop)
    log(f"encoding a {spec.width}x{spec.height} {spec.fps} fps stretch of video")
    stretch = LoopedVideo(spec, num_gops=max(8, args.concurrency + 2), seed=args.seed)
    return BenchVideos(
        main=stretch.write(directory / "video.mp4", args.video_seconds),
        fresh=stretch.write(directory / "fresh.mp4", args.video_seconds, first_gop=2)
        if args.itl_streams
        else None,
        warmup=stretch.write(directory / "warmup.mp4", min(args.video_seconds, 8.0), first_gop=1),
        concurrent=[
            stretch.write(directory / f"concurrent_{i}.mp4", args.concurrent_seconds, 2 + i)
            for i in range(args.concurrency)
        ],
        codec=stretch.codec,
    )


def measure_in_process(
    args: argparse.Namespace,
    server_args: ServerArgs,
    config: QuicksviewerConfig,
    processor: QuicksviewerProcessor,
    videos: BenchVideos,
) -> dict[str, Any]:
    """cubeserve's frontend and vision stages, and the original-style baseline; every model
    built here is freed on return, before the engine sizes its KV pool from free memory."""
    device = resolve_device(server_args.device)
    dtype = resolve_dtype(server_args.dtype, config, device)
    size, norm = processor.config.image_size, processor.config.normalization

    def sampled(path: Path) -> np.ndarray:
        return read_video(path, fps=args.sample_fps, num_frames=args.max_frames).frames

    def request(path: Path) -> ProcessedRequest:
        return processor.process([video_message(path, args, "Describe what happens.")])

    log("cubeserve stages in this process: decoding, frontend, vision")
    warmup = request(videos.warmup)
    decode_s, frames = timed(device, lambda: sampled(videos.main))
    frontend_s, processed = timed(device, lambda: request(videos.main))
    encoder = load_model(QuicksviewerVisionEncoder, config, None, dtype, device, "dummy")
    encoder.vision_tower.max_batch_size = server_args.vision_batch_size
    encoder.warm_up(encoder.vision_tower.max_batch_size)  # as the engine does at start-up
    vision_s, _ = timed(device, lambda: encode_on_device(encoder, processed.media[0]))

    log("original-style baseline: sequential decoding, per-frame preprocessing, HF models")
    per_frame_s, timed_frames = original_style_decode_seconds(
        videos.main, args.baseline_decode_seconds
    )
    original = OriginalStyleModel(config, server_args, encoder)

    def baseline(path: Path, frames: np.ndarray, processed: ProcessedRequest) -> dict[str, Any]:
        decode_s = per_frame_s * probe_video(path).frame_count
        return measure_baseline(original, frames, processed, decode_s, size, norm)

    baseline(videos.warmup, sampled(videos.warmup), warmup)
    main = baseline(videos.main, frames, processed)
    concurrent = None
    if videos.concurrent:
        path = videos.concurrent[0]
        one = baseline(path, sampled(path), request(path))
        concurrent = one_at_a_time(one["ttft_s"], len(videos.concurrent))
    original.close()
    return {
        "dtype": dtype,
        "sampled_frames": processed.media[0].num_views,
        "cubeserve_stages": {"decode": decode_s, "frontend": frontend_s, "vision": vision_s},
        "baseline": {**main, "decode_timed_frames": timed_frames, "concurrent": concurrent},
    }


def measure_engine(
    args: argparse.Namespace,
    server_args: ServerArgs,
    config: QuicksviewerConfig,
    videos: BenchVideos,
) -> dict[str, Any]:
    log("starting the engine")
    conversation = [video_message(videos.main, args, "Describe what happens.")]
    with cubeserve.Engine.from_server_args(server_args) as engine:
        first_token(engine, messages=[video_message(videos.warmup, args, "Describe what happens.")])
        log("first turn")
        before = engine.get_stats()
        ttft_s, first = first_token(engine, messages=conversation)
        log("second turn on the same video")
        follow_up = [
            *conversation,
            {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": "And what happens at the end?"},
        ]
        second_ttft_s, second = first_token(engine, messages=follow_up)
        after = engine.get_stats()
        prompt_tokens = first["meta_info"]["prompt_tokens"]
        log(f"prefill of {prompt_tokens} text tokens")
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, config.text_config.vocab_size, prompt_tokens).tolist()
        prefill_s, _ = first_token(engine, input_ids=ids)
        streams = None
        if videos.fresh is not None:
            log(f"{args.itl_streams} text streams while a new video arrives")
            vocab_size = config.text_config.vocab_size
            streams = asyncio.run(
                streams_while_video_arrives(engine, videos.fresh, args, vocab_size)
            )
        concurrent = None
        if videos.concurrent:
            log(f"{len(videos.concurrent)} different videos at once")
            concurrent = {
                "videos": len(videos.concurrent),
                "video_seconds": args.concurrent_seconds,
                "output_len": args.output_len,
                **measure_concurrency(engine, videos.concurrent, args),
            }
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft_s,
        "prefill_s": prefill_s,
        "second_turn": {
            "ttft_s": round(second_ttft_s, 4),
            "cached_tokens": second["meta_info"]["cached_tokens"],
            "encoder_cache_hits": after.encoder_cache_hits - before.encoder_cache_hits,
        },
        "concurrent": concurrent,
        "streams_while_video_arrives": streams,
    }


def run(args: argparse.Namespace, server_args: ServerArgs, work: Path) -> dict[str, Any]:
    model_dir = write_checkpoint(work / "model", MODEL_SHAPES[args.model_shape])
    server_args = dataclasses.replace(
        server_args, model_path=str(model_dir), allowed_local_media_path=str(work)
    )
    config = load_quicksviewer_config(model_dir)
    videos = write_videos(args, work)
    probe = probe_video(videos.main)
    processor = QuicksviewerProcessor.from_pretrained(model_dir, allowed_local_media_path=work)
    measured = measure_in_process(args, server_args, config, processor, videos)
    free_memory()
    served = measure_engine(args, server_args, config, videos)
    log("done")

    stages = measured["cubeserve_stages"]
    baseline = measured["baseline"]
    concurrent, baseline_concurrent = served["concurrent"], baseline["concurrent"]
    return {
        "bench": "video",
        "run_name": args.run_name,
        "model_shape": args.model_shape,
        "load_format": "dummy",
        "dtype": str(measured["dtype"]).removeprefix("torch."),
        "video": {
            "seconds": round(probe.frame_count / probe.fps, 2),
            "width": probe.width,
            "height": probe.height,
            "fps": probe.fps,
            "gop": args.gop,
            "codec": videos.codec,
            "sample_fps": args.sample_fps,
            "sampled_frames": measured["sampled_frames"],
        },
        "prompt_tokens": served["prompt_tokens"],
        "cubeserve": {
            "ttft_s": round(served["ttft_s"], 4),
            "breakdown_s": rounded(
                {
                    "decode": stages["decode"],
                    "frontend_decode_resize_hash": stages["frontend"],
                    "vision": stages["vision"],
                    "prefill": served["prefill_s"],
                }
            ),
            "second_turn": served["second_turn"],
            "streams_while_video_arrives": served["streams_while_video_arrives"],
            "concurrent": concurrent,
        },
        "baseline": {
            "ttft_s": round(baseline["ttft_s"], 4),
            "breakdown_s": rounded(baseline["breakdown_s"]),
            "decode_timed_frames": baseline["decode_timed_frames"],
            "concurrent_one_at_a_time": baseline_concurrent,
        },
        "speedup_vs_baseline": {
            "ttft": ratio(baseline["ttft_s"], served["ttft_s"]),
            "videos_per_min": ratio(
                concurrent["videos_per_min"] if concurrent else None,
                baseline_concurrent["videos_per_min"] if baseline_concurrent else None,
            ),
        },
        "env": {**environment(), "cpus": available_cpus()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    # Few decode batch sizes to capture: this bench runs at most --concurrency requests.
    parser.set_defaults(load_format="dummy", cuda_graph_max_bs=16)
    add = parser.add_argument
    add("--model-shape", choices=sorted(MODEL_SHAPES), default="quicksviewer-7b")
    add("--video-seconds", type=float, default=420.0, help="length of the TTFT video")
    add("--width", type=int, default=1280)
    add("--height", type=int, default=720)
    add("--video-fps", type=int, default=30)
    add("--gop", type=int, default=30, help="frames per GOP (keyframe interval)")
    add("--sample-fps", type=float, default=1.0, help="frames sampled per second of video")
    add("--max-frames", type=int, default=420)
    add("--itl-streams", type=int, default=2,
        help="text streams decoding while a new video arrives (0: skip)")  # fmt: skip
    add("--itl-stream-tokens", type=int, default=4096, help="their max_new_tokens (they are "
        "stopped when the video's first token is back)")  # fmt: skip
    add("--itl-baseline-seconds", type=float, default=1.0,
        help="how long the streams decode before the video arrives")  # fmt: skip
    add("--concurrency", type=int, default=16, help="different videos sent at once (0: skip)")
    add("--concurrent-seconds", type=float, default=60.0, help="length of each of those videos")
    add("--output-len", type=int, default=16, help="tokens generated per concurrent request")
    add("--baseline-decode-seconds", type=float, default=60.0,
        help="video seconds the original-style sequential decoding is timed on, then scaled")  # fmt: skip
    return parser.parse_args(argv)


def run_in_scratch_dir(
    name: str,
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace, ServerArgs, Path], dict[str, Any]],
) -> None:
    """Run a bench that writes its own checkpoint (random weights) and inputs into a scratch
    directory, removed afterwards; emit its record as ``<name>.jsonl``."""
    if args.load_format != "dummy":
        raise SystemExit(f"the {name} bench builds its own checkpoint: only --load-format dummy")
    work = Path(tempfile.mkdtemp(prefix=f"cubeserve-{name}-bench-"))
    try:
        record = measure(args, ServerArgs.from_cli_args(args), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(record, name, args)


def main(argv: list[str] | None = None) -> None:
    run_in_scratch_dir("video", parse_args(argv), run)


if __name__ == "__main__":
    main()
