"""Quicksviewer request processing: OpenAI-style chat messages -> prompt, token ids, pixels.

Reproduces the original Quicksviewer preprocessing (golden README sections 3, 4, 5.5, 5.9).

Public API
----------
``IMAGE_PLACEHOLDER_ID = -200``, ``IMAGE_MARKER = "<image>"``

``QuicksviewerProcessorConfig`` (frozen dataclass)
    ``image_size``, ``grid_pinpoints``, ``normalization``, ``conv_template`` ("qwen2" | "llama_3"),
    ``image_aspect_ratio``, ``mm_use_thumbnail``, ``mm_use_thumbnail_start_end``,
    ``mm_use_video_start_end``, ``mm_use_im_start_end``, ``mm_use_patch_start_end``;
    ``from_dicts(model_config, preprocessor_config, conv_template=None)``,
    ``from_model_dir(model_dir, conv_template=None)`` (original on-disk format: ``config.json``
    with ``mm_*`` fields and ``<mm_vision_tower>/preprocessor_config.json``; converted format:
    everything from ``config.json``).

``MediaItem`` (dataclass), one per image / video, in prompt order
    ``kind`` ("image" | "video"), ``pixels`` (views or frames, S, S, 3) uint8 - 4x smaller
    to send to the engine than float pixels, which it normalises on the model's device -
    and ``normalization``; ``pixel_values`` (views or frames, 3, S, S) float32 on the CPU,
    ``pixel_values_on(device, dtype)`` (normalised on ``device``),
    ``content_hash`` (63-bit int), ``image_sizes`` ((W, H) per frame for a video, one for an
    image), ``num_views`` (frames or views), ``placeholder_span`` (half-open range of this
    item's placeholders, counted among all -200 ids of the request; a video's span includes its
    thumbnail placeholder), ``timestamps`` / ``frame_indices`` (video), ``has_thumbnail``.

``ProcessedRequest`` (dataclass)
    ``prompt`` (str, with literal ``<image>`` markers), ``input_ids`` (list[int], -200 per
    marker), ``media`` (list[MediaItem]); properties ``pixel_values`` (all items concatenated or
    None), ``view_offsets``, ``imidx_in_multi``, ``video_spans``, ``placeholder_positions``;
    ``merge_cubes(frame_bounds_per_video) -> list[int]``.

``QuicksviewerProcessor(tokenizer, config, *, allowed_local_media_path=None, limits=MediaLimits(),
default_video_fps=1.0, default_max_frames=420,
media_cache_bytes=4 GiB)``
    ``from_pretrained(model_dir, tokenizer=None, conv_template=None, **kwargs)``,
    ``process(messages, add_generation_prompt=True) -> ProcessedRequest``.
    Media given as a file or inline bytes (data: URL) are decoded and preprocessed once: an LRU
    (``media_cache``, bounded in bytes) keeps the ``MediaItem`` per (source identity, fps,
    max_frames); a file is identified by path, size and mtime, inline data by its hash.
    ``messages``: ``{"role": "system"|"user"|"assistant", "content": str | list[part]}`` with
    parts ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}``,
    ``{"type": "video_url", "video_url": {"url", "fps"?, "max_frames"?}}``, and for Python
    callers ``{"type": "image", "image": PIL.Image | ndarray | bytes | url}`` and
    ``{"type": "video", "video": VideoFrames | ndarray (T,H,W,3) | list of frames | bytes | url,
    "timestamps"?, "fps"?, "max_frames"?}`` (``fps`` / ``max_frames`` sample encoded videos,
    defaults ``default_video_fps`` / ``default_max_frames``; pre-decoded frames are used as given,
    ``fps`` then only dates frames that come without timestamps). Visual inputs go first in their message, each
    followed by a newline, then the message's text parts joined by newlines (as the original
    chat entry point does); a message with media is ``strip()``ped. Media are only allowed in
    user messages. A literal ``<image>`` typed by a user is ordinary text (never a placeholder).

``CHAT_TEMPLATES`` / ``resolve_chat_template(name)`` / ``template_for_backbone(model_config)``
    "qwen2" and "llama_3" (aliases: "llama_3_chat", "llama3", ...); the Llama-3 template uses
    the ``system`` header for assistant turns, as the original does.
``tokenize_with_placeholders(chunks, tokenizer) -> list[int]``
    Tokenize text chunks (the prompt split at ``<image>``) and join them with -200, keeping a
    BOS once at the start.
``merge_video_placeholders(input_ids, video_spans, frame_bounds, *, has_thumbnail=True)``
    -> ``list[int]`` (README 5.5, located structurally; see its docstring).
``kept_timestamps(timestamps, frame_bounds) -> list[float]``
``cube_bounds_as_returned(frame_bounds, has_thumbnail=True) -> list[list[int]]``
``postprocess_output_ids(ids, tokenizer, terminators=None) -> str``
``load_tokenizer(model_dir)``
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from cubeserve.engine.tokenizer import load_tokenizer
from cubeserve.multimodal.cache import ByteBoundedLRU
from cubeserve.multimodal.image import (
    PixelNormalization,
    anyres_views,
    normalize_pixels,
    parse_grid_pinpoints,
    resize_bicubic,
    resize_frames,
)
from cubeserve.multimodal.media import (
    MediaError,
    MediaLimits,
    content_hash,
    decode_image,
    read_source_bytes,
    resolve_media_source,
    to_pil_image,
)
from cubeserve.multimodal.transport import MediaNotCachedError, PixelFile
from cubeserve.multimodal.video import (
    VideoFrames,
    frames_content_hash,
    read_video,
    video_from_frames,
)
from cubeserve.utils import to_device

IMAGE_PLACEHOLDER_ID = -200
IMAGE_MARKER = "<image>"

MediaKind = Literal["image", "video"]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user_role: str
    assistant_role: str
    separator: str
    system_format: str  # "{system}" is replaced by the system message


CHAT_TEMPLATES = {
    "qwen2": ChatTemplate(
        name="qwen2",
        user_role="<|im_start|>user\n",
        assistant_role="<|im_start|>assistant\n",
        separator="<|im_end|>\n",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
    ),
    # The original labels the model's turns with the ``system`` header.
    "llama_3": ChatTemplate(
        name="llama_3",
        user_role="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant_role="<|start_header_id|>system<|end_header_id|>\n\n",
        separator="<|eot_id|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    ),
}

_TEMPLATE_ALIASES = {
    "qwen2": "qwen2",
    "qwen_2": "qwen2",
    "qwen": "qwen2",
    "chatml": "qwen2",
    "llama_3": "llama_3",
    "llama_3_chat": "llama_3",
    "llama3": "llama_3",
    "llama-3": "llama_3",
}


def resolve_chat_template(name: str) -> ChatTemplate:
    key = _TEMPLATE_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown conversation template {name!r}; known: qwen2, llama_3")
    return CHAT_TEMPLATES[key]


def template_for_backbone(model_config: dict) -> str:
    names = " ".join(
        [str(model_config.get("model_type", ""))] + list(model_config.get("architectures") or [])
    )
    return "llama_3" if "llama" in names.lower() else "qwen2"


@dataclass(frozen=True)
class QuicksviewerProcessorConfig:
    image_size: int
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    normalization: PixelNormalization = PixelNormalization()
    conv_template: str = "qwen2"
    image_aspect_ratio: str | None = "anyres"
    mm_use_thumbnail: bool = False
    mm_use_thumbnail_start_end: bool = False
    mm_use_video_start_end: bool = False
    mm_use_im_start_end: bool = False
    mm_use_patch_start_end: bool = False

    @classmethod
    def from_dicts(
        cls, model_config: dict, preprocessor_config: dict, conv_template: str | None = None
    ) -> QuicksviewerProcessorConfig:
        pinpoints = model_config.get("image_grid_pinpoints")
        return cls(
            image_size=_image_size(preprocessor_config),
            grid_pinpoints=tuple(parse_grid_pinpoints(pinpoints)) if pinpoints else (),
            normalization=PixelNormalization.from_preprocessor_config(preprocessor_config),
            conv_template=resolve_chat_template(
                conv_template or template_for_backbone(model_config)
            ).name,
            image_aspect_ratio=model_config.get("image_aspect_ratio", "anyres"),
            # Missing flag: the model side builds a thumbnail (the original defaults it on there).
            mm_use_thumbnail=bool(model_config.get("mm_use_thumbnail", True)),
            mm_use_thumbnail_start_end=bool(model_config.get("mm_use_thumbnail_start_end", False)),
            mm_use_video_start_end=bool(model_config.get("mm_use_video_start_end", False)),
            mm_use_im_start_end=bool(model_config.get("mm_use_im_start_end", False)),
            mm_use_patch_start_end=bool(model_config.get("mm_use_patch_start_end", False)),
        )

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike, conv_template: str | None = None
    ) -> QuicksviewerProcessorConfig:
        model_dir = Path(model_dir)
        model_config = json.loads((model_dir / "config.json").read_text())
        if model_config.get("model_type") == "quicksviewer":  # converted: pixel settings in config.json
            preprocessor_config = {
                key: model_config[key]
                for key in ("image_mean", "image_std", "rescale_factor")
                if key in model_config
            }
            preprocessor_config["size"] = model_config.get("image_size")
            return cls.from_dicts(
                model_config, preprocessor_config, conv_template or model_config.get("conv_template")
            )
        tower = Path(model_config.get("mm_vision_tower") or "siglip_vision")
        tower_dir = tower if tower.is_absolute() else model_dir / tower
        preprocessor_path = tower_dir / "preprocessor_config.json"
        if not preprocessor_path.is_file():
            raise FileNotFoundError(f"vision preprocessor config not found at {preprocessor_path}")
        preprocessor_config = json.loads(preprocessor_path.read_text())
        return cls.from_dicts(model_config, preprocessor_config, conv_template)


def _image_size(preprocessor_config: dict) -> int:
    size = preprocessor_config.get("size", preprocessor_config.get("crop_size"))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"cannot read the image size from the preprocessor config: {size!r}")
    return size


# --------------------------------------------------------------------------- outputs


@dataclass
class MediaItem:
    kind: MediaKind
    # (frames or views, S, S, 3) uint8 RGB, resized. On the way to the engine: a PixelFile, or
    # None when sent by reference (``cubeserve.multimodal.transport``).
    pixels: np.ndarray | PixelFile | None
    content_hash: int
    image_sizes: list[tuple[int, int]]  # (W, H): one per frame (video) / one (image)
    num_views: int
    placeholder_span: tuple[int, int] = (0, 0)
    timestamps: list[float] | None = None
    frame_indices: list[int] | None = None
    has_thumbnail: bool = False
    normalization: PixelNormalization = PixelNormalization()

    @property
    def pixel_values(self) -> torch.Tensor:
        """(frames or views, 3, S, S) float32, normalised on the CPU."""
        return normalize_pixels(self.pixels, self.normalization)

    def take_pixels(self) -> np.ndarray:
        """The uint8 pixels, read from their file (which goes away) if they came by one;
        raises MediaNotCachedError if they were sent by reference."""
        if self.pixels is None:
            raise MediaNotCachedError(f"{self.kind} {self.content_hash:x} was sent by reference")
        if isinstance(self.pixels, PixelFile):
            self.pixels = self.pixels.read_once()
        return self.pixels

    def pixel_values_on(
        self, device: torch.device, dtype: torch.dtype, views: slice = slice(None)
    ) -> torch.Tensor:
        """``pixel_values[views]`` on ``device`` in ``dtype``: the uint8 pixels cross to the
        device (a quarter of float32's bytes) and are normalised there, with the same float32
        values."""
        uint8_pixels = to_device(torch.from_numpy(self.take_pixels()[views]), torch.uint8, device)
        return normalize_pixels(uint8_pixels, self.normalization, dtype)

    @property
    def num_placeholders(self) -> int:
        return self.placeholder_span[1] - self.placeholder_span[0]


@dataclass
class ProcessedRequest:
    prompt: str
    input_ids: list[int]
    media: list[MediaItem] = field(default_factory=list)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        if not self.media:
            return None
        return torch.cat([item.pixel_values for item in self.media])

    @property
    def view_offsets(self) -> list[int]:
        """Index of each item's first view/frame in ``pixel_values``."""
        offsets, total = [], 0
        for item in self.media:
            offsets.append(total)
            total += item.num_views
        return offsets

    @property
    def imidx_in_multi(self) -> list[int]:
        """The original's per-image start indices: every video frame counts as an image."""
        starts = []
        for item, offset in zip(self.media, self.view_offsets, strict=True):
            starts.extend(
                range(offset, offset + item.num_views) if item.kind == "video" else [offset]
            )
        return starts

    @property
    def video_spans(self) -> list[tuple[int, int]]:
        return [item.placeholder_span for item in self.media if item.kind == "video"]

    @property
    def placeholder_positions(self) -> list[int]:
        return [i for i, t in enumerate(self.input_ids) if t == IMAGE_PLACEHOLDER_ID]

    def merge_cubes(self, frame_bounds_per_video: Sequence[Sequence[Sequence[int]]]) -> list[int]:
        """``input_ids`` after the cube merge, given each video's cubes ([start, end) frames)."""
        videos = [item for item in self.media if item.kind == "video"]
        has_thumbnail = any(v.has_thumbnail for v in videos)
        return merge_video_placeholders(
            self.input_ids, self.video_spans, frame_bounds_per_video, has_thumbnail=has_thumbnail
        )


# --------------------------------------------------------------------------- tokenization


class _Placeholder:
    """Marks one ``<image>`` position while the prompt is assembled."""


_PLACEHOLDER = _Placeholder()


def tokenize_with_placeholders(chunks: Sequence[str], tokenizer) -> list[int]:
    """Tokenize each chunk (default special tokens) and join with -200; BOS kept once."""
    chunk_ids = tokenizer(list(chunks), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and chunk_ids[0][:1] == [bos]
    ids: list[int] = [bos] if keep_bos else []
    for k, piece in enumerate(chunk_ids):
        if k:
            ids.append(IMAGE_PLACEHOLDER_ID)
        ids.extend(piece[1:] if keep_bos and piece[:1] == [bos] else piece)
    return ids


def _render(segments: Iterable) -> tuple[str, list[str]]:
    """Prompt string and the text chunks between placeholders."""
    chunks, current = [], []
    for seg in segments:
        if seg is _PLACEHOLDER:
            chunks.append("".join(current))
            current = []
        else:
            current.append(seg)
    chunks.append("".join(current))
    return IMAGE_MARKER.join(chunks), chunks


# --------------------------------------------------------------------------- cube merge


def merge_video_placeholders(
    input_ids: Sequence[int],
    video_spans: Sequence[Sequence[int]],
    frame_bounds: Sequence[Sequence[Sequence[int]]],
    *,
    has_thumbnail: bool = True,
    placeholder_id: int = IMAGE_PLACEHOLDER_ID,
) -> list[int]:
    """Reduce each video's frame placeholders to one per cube (README 5.5).

    ``video_spans[v]`` is the half-open range of video v's placeholders, counted among all
    placeholders of ``input_ids`` (thumbnail included when ``has_thumbnail``);
    ``frame_bounds[v]`` are its cubes as consecutive half-open frame ranges. For a frame that
    does not start a cube, its placeholder and the text between the previous placeholder and it
    (its timestamp) are removed. Everything else - the thumbnail, text outside the videos,
    image placeholders - is kept. The videos are located by placeholder position only, so text
    inside a prompt (a literal pad token, for instance) cannot change the result.
    """
    if len(video_spans) != len(frame_bounds):
        raise ValueError(f"{len(video_spans)} video spans but {len(frame_bounds)} cube lists")
    positions = [i for i, t in enumerate(input_ids) if t == placeholder_id]
    keep = np.ones(len(input_ids), dtype=bool)
    for (span_start, span_end), cubes in zip(video_spans, frame_bounds, strict=True):
        first_frame = span_start + int(has_thumbnail)
        num_frames = span_end - first_frame
        if span_start < 0 or span_end > len(positions) or num_frames < 1:
            raise ValueError(f"video span {(span_start, span_end)} does not match the placeholders")
        starts = _cube_starts(cubes, num_frames)
        for frame in range(1, num_frames):
            if frame not in starts:
                ordinal = first_frame + frame
                keep[positions[ordinal - 1] + 1 : positions[ordinal] + 1] = False
    return [t for t, k in zip(input_ids, keep, strict=True) if k]


def _cube_starts(cubes: Sequence[Sequence[int]], num_frames: int) -> set[int]:
    expected = 0
    for start, end in cubes:
        if start != expected or end <= start:
            raise ValueError(
                f"cubes must be consecutive non-empty frame ranges from 0, got {list(cubes)}"
            )
        expected = end
    if expected != num_frames:
        raise ValueError(f"cubes cover {expected} frames but the video has {num_frames}")
    return {int(start) for start, _ in cubes}


def kept_timestamps(
    timestamps: Sequence[float], frame_bounds: Sequence[Sequence[int]]
) -> list[float]:
    """Timestamps whose text survives the cube merge (the first frame of every cube)."""
    return [timestamps[start] for start, _ in frame_bounds]


def cube_bounds_as_returned(
    frame_bounds: Sequence[Sequence[int]], has_thumbnail: bool = True
) -> list[list[int]]:
    """The original's cube bounds: a leading [0, 1] thumbnail segment and cubes shifted by one."""
    if not has_thumbnail:
        return [[int(s), int(e)] for s, e in frame_bounds]
    return [[0, 1]] + [[int(s) + 1, int(e) + 1] for s, e in frame_bounds]


# --------------------------------------------------------------------------- output text

_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def postprocess_output_ids(
    ids: Sequence[int], tokenizer, terminators: Iterable[int] | None = None
) -> str:
    """The original's returned string for generated ids (README 5.9).

    Drops every id 0, a leading BOS and one trailing terminator (default: the tokenizer's EOS),
    decodes keeping special tokens, applies the legacy space clean-up when the tokenizer asks
    for it, and strips.
    """
    ids = [int(t) for t in ids if int(t) != 0]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    stops = set(terminators) if terminators is not None else {tokenizer.eos_token_id}
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        for old, new in _CLEANUP_REPLACEMENTS:
            text = text.replace(old, new)
    return text.strip()


# --------------------------------------------------------------------------- processor


DEFAULT_MEDIA_CACHE_BYTES = 4 << 30

# (kind, source identity, sampling options): see ``_source_identity``.
MediaCacheKey = tuple[Any, ...]


@dataclass
class _MessagePlan:
    role: str
    text: str
    media: list[MediaItem]


def _source_identity(source: bytes | Path) -> tuple[Any, ...]:
    """Identifies encoded media without decoding it: inline bytes by their hash, a local file
    by its resolved path, size and modification time (so an edited file is decoded anew)."""
    if isinstance(source, bytes):
        return ("bytes", content_hash(source))
    try:
        stat = source.stat()
    except OSError as exc:
        raise MediaError(f"cannot read media file: {exc.strerror or exc}") from None
    return ("file", str(source), stat.st_size, stat.st_mtime_ns)


def _media_item_nbytes(item: MediaItem) -> int:
    return item.pixels.nbytes


class QuicksviewerProcessor:
    """Chat messages -> ``ProcessedRequest`` for a Quicksviewer model."""

    def __init__(
        self,
        tokenizer,
        config: QuicksviewerProcessorConfig,
        *,
        allowed_local_media_path: str | os.PathLike | None = None,
        limits: MediaLimits = MediaLimits(),
        default_video_fps: float = 1.0,
        default_max_frames: int | None = 420,
        media_cache_bytes: int = DEFAULT_MEDIA_CACHE_BYTES,
    ) -> None:
        """``media_cache_bytes`` bounds the decoded and preprocessed media kept for files and
        inline data seen before (0 disables it); pre-decoded frames and images are not cached."""
        self.tokenizer = tokenizer
        self.config = config
        self.template = resolve_chat_template(config.conv_template)
        self.allowed_local_media_path = allowed_local_media_path
        self.limits = limits
        self.default_video_fps = default_video_fps
        self.default_max_frames = default_max_frames
        self.media_cache: ByteBoundedLRU[MediaCacheKey, MediaItem] = ByteBoundedLRU(
            media_cache_bytes, _media_item_nbytes
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        tokenizer=None,
        conv_template: str | None = None,
        **kwargs: Any,
    ) -> QuicksviewerProcessor:
        config = QuicksviewerProcessorConfig.from_model_dir(model_dir, conv_template)
        return cls(tokenizer or load_tokenizer(model_dir), config, **kwargs)

    # ---- public entry point

    def process(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> ProcessedRequest:
        system, plans = self._plan_messages(messages, add_generation_prompt)
        segments: list = (
            [self.template.system_format.format(system=system)] if system is not None else []
        )
        media: list[MediaItem] = []
        num_placeholders = 0
        for plan in plans:
            role = self.template.user_role if plan.role == "user" else self.template.assistant_role
            body: list = []
            for processed in plan.media:
                block = self._media_block(processed)
                processed.placeholder_span = (
                    num_placeholders,
                    num_placeholders + sum(s is _PLACEHOLDER for s in block),
                )
                num_placeholders = processed.placeholder_span[1]
                media.append(processed)
                body.extend(block)
                body.append("\n")
            body.append(plan.text)
            if plan.media:
                body = _strip_segments(body)
            segments.extend([role, *body, self.template.separator])
        if add_generation_prompt:
            segments.append(self.template.assistant_role)
        prompt, chunks = _render(segments)
        return ProcessedRequest(
            prompt=prompt, input_ids=tokenize_with_placeholders(chunks, self.tokenizer), media=media
        )

    # ---- messages

    def _plan_messages(
        self, messages: Sequence[dict], add_generation_prompt: bool
    ) -> tuple[str | None, list[_MessagePlan]]:
        if not messages:
            raise ValueError("messages must not be empty")
        system_texts: list[str] = []
        plans: list[_MessagePlan] = []
        for position, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("system", "developer"):
                if plans:
                    raise ValueError(
                        "a system message is only allowed at the start of the conversation"
                    )
                text, media = self._parse_content(message.get("content"), allow_media=False)
                system_texts.append(text)
            elif role in ("user", "assistant"):
                text, media = self._parse_content(
                    message.get("content"),
                    allow_media=role == "user",
                    field=f"messages.{position}.content",
                )
                plans.append(_MessagePlan(role, text, media))
            else:
                raise ValueError(f"unsupported message role {role!r}")
        if not plans:
            raise ValueError("messages need at least one user message")
        if add_generation_prompt and plans[-1].role != "user":
            raise ValueError("the last message must be a user message")
        return ("\n".join(system_texts) if system_texts else None), plans

    def _parse_content(
        self, content: Any, allow_media: bool, field: str = "content"
    ) -> tuple[str, list]:
        """Text and loaded media of one message; a ``MediaError`` names its part (``param``)."""
        if content is None:
            return "", []
        if isinstance(content, str):
            return content, []
        if not isinstance(content, (list, tuple)):
            raise ValueError(
                f"message content must be a string or a list of parts, got {type(content).__name__}"
            )
        texts: list[str] = []
        media: list = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
                continue
            if kind not in ("image_url", "image", "video_url", "video"):
                raise ValueError(f"unsupported content part type {kind!r}")
            if not allow_media:
                raise ValueError(f"{kind} parts are only allowed in user messages")
            try:
                media.append(
                    self._load_image(part) if kind.startswith("image") else self._load_video(part)
                )
            except MediaError as exc:
                exc.param = f"{field}.{index}.{kind}"
                raise
        return "\n".join(texts), media

    # ---- media loading

    def _load_image(self, part: dict) -> MediaItem:
        payload = part.get(part["type"])
        if isinstance(payload, dict):
            payload = payload.get("url")
        if payload is None:
            raise MediaError(f"{part['type']} part without an image")
        if isinstance(payload, (Image.Image, np.ndarray)):
            return self._image_item(to_pil_image(payload, limits=self.limits))
        source = resolve_media_source(
            payload, allowed_local_media_path=self.allowed_local_media_path, limits=self.limits
        )
        return self._cached(
            ("image", _source_identity(source)),
            lambda: self._image_item(
                decode_image(read_source_bytes(source, limits=self.limits), limits=self.limits)
            ),
        )

    def _load_video(self, part: dict) -> MediaItem:
        options = part.get(part["type"])
        if not isinstance(options, dict):
            options = {"url": options}
        options = {**{k: v for k, v in part.items() if k not in ("type", part["type"])}, **options}
        payload = options.get("url", options.get("video", options.get("frames")))
        if payload is None:
            raise MediaError(f"{part['type']} part without a video")
        fps = options.get("fps")
        max_frames = options.get("max_frames", options.get("num_frames", self.default_max_frames))
        if isinstance(payload, VideoFrames):
            return self._video_item(payload)
        if isinstance(payload, (np.ndarray, list, tuple)):
            return self._video_item(
                video_from_frames(
                    payload,
                    options.get("timestamps"),
                    fps=fps,
                    frame_indices=options.get("frame_indices"),
                    limits=self.limits,
                )
            )
        source = resolve_media_source(
            payload, allowed_local_media_path=self.allowed_local_media_path, limits=self.limits
        )
        sample_fps = float(fps) if fps is not None else self.default_video_fps
        num_frames = int(max_frames) if max_frames is not None else None
        return self._cached(
            ("video", _source_identity(source), sample_fps, num_frames),
            lambda: self._video_item(
                read_video(
                    source,
                    fps=sample_fps,
                    num_frames=num_frames,
                    limits=self.limits,
                    frame_size=self.config.image_size,
                )
            ),
        )

    def _cached(self, key: MediaCacheKey, load: Callable[[], MediaItem]) -> MediaItem:
        """``load()``'s item, decoded and preprocessed once per key while it stays cached.

        Returns a copy: ``process`` sets the copy's ``placeholder_span``, which differs between
        requests (and between two uses of one medium in a request); the pixels are shared.
        """
        item = self.media_cache.get(key)
        if item is None:
            item = load()
            self.media_cache.put(key, item)
        return replace(item)

    # ---- prompt blocks and pixels

    def _media_block(self, item: MediaItem) -> list:
        if item.kind == "video":
            return self._video_block(item.timestamps)
        return self._image_block(item.num_views)

    def _video_block(self, timestamps: Sequence[float]) -> list:
        cfg = self.config
        block: list = []
        if cfg.mm_use_thumbnail:
            block += (
                ["<thumbnail_start>", _PLACEHOLDER, "<thumbnail_end>"]
                if cfg.mm_use_thumbnail_start_end
                else [_PLACEHOLDER]
            )
        for ts in timestamps:
            block += [str(float(ts)), _PLACEHOLDER]
        if cfg.mm_use_video_start_end:
            block = ["<video_start>", *block, "<video_end>"]
        return block

    def _image_block(self, num_views: int) -> list:
        view = (
            ["<patch_start>", _PLACEHOLDER, "<patch_end>"]
            if self.config.mm_use_patch_start_end
            else [_PLACEHOLDER]
        )
        block = view * num_views
        if self.config.mm_use_im_start_end:
            block = ["<im_start>", *block, "<im_end>"]
        return block

    def _video_item(self, video: VideoFrames) -> MediaItem:
        squashed = resize_frames(video.frames, self.config.image_size)
        # Frames squashed while decoding come with their digests, taken in the decoding threads.
        digests = video.frame_digests if squashed is video.frames else None
        return MediaItem(
            kind="video",
            pixels=squashed,
            normalization=self.config.normalization,
            content_hash=frames_content_hash(squashed, salt=b"video", frame_digests=digests),
            image_sizes=[video.size_wh] * video.num_frames,
            num_views=video.num_frames,
            timestamps=[float(t) for t in video.timestamps],
            frame_indices=list(video.frame_indices),
            has_thumbnail=self.config.mm_use_thumbnail,
        )

    def _image_item(self, image: Image.Image) -> MediaItem:
        size = self.config.image_size
        if self.config.image_aspect_ratio == "anyres" and self.config.grid_pinpoints:
            views = anyres_views(image, size, self.config.grid_pinpoints)
        else:
            views = np.asarray(resize_bicubic(image, (size, size)))[None]
        return MediaItem(
            kind="image",
            pixels=views,
            normalization=self.config.normalization,
            content_hash=content_hash(views, salt=b"image"),
            image_sizes=[image.size],
            num_views=len(views),
        )


def _strip_segments(segments: list) -> list:
    """``str.strip()`` of the message the segments render to (placeholders are not whitespace)."""
    merged: list = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    if merged and isinstance(merged[0], str):
        merged[0] = merged[0].lstrip()
    if merged and isinstance(merged[-1], str):
        merged[-1] = merged[-1].rstrip()
    return [s for s in merged if s != ""]
