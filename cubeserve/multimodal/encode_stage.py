"""The engine-side multimodal stage: vision encoding before a request's first prefill.

For a Quicksviewer request it runs the vision encoder on every media item (through an
encoder cache keyed by the item's content hash), lets cubing decide which timestamp
placeholders survive (``ProcessedRequest.merge_cubes``), and expands each surviving
placeholder into ``num_queries`` pad ids. The pad ids lie above the vocabulary and are derived
from the media's content hash, so the radix cache shares a video's KV between requests that
show the same video and never between two different videos.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from cubeserve.models.quicksviewer import QuicksviewerForCausalLM
from cubeserve.models.quicksviewer_vision import VideoEncoding
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    MediaItem,
    ProcessedRequest,
)
from cubeserve.scheduler.request import Req

_PAD_ID_RANGE = 1 << 30


@dataclass
class EncodedMedia:
    blocks: torch.Tensor  # (num_blocks, num_queries, hidden), in placeholder order
    video: VideoEncoding | None  # cubing result, videos only

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()


class EncoderCache:
    """LRU of encoded media by content hash, bounded in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[str, int], EncodedMedia] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.queries = 0

    def get(self, key: tuple[str, int]) -> EncodedMedia | None:
        self.queries += 1
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, int], entry: EncodedMedia) -> None:
        if entry.nbytes > self.capacity_bytes:
            return
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes


def pad_token_id(vocab_size: int, content_hash: int, block: int) -> int:
    """Id standing for block ``block`` of one media item; outside the vocabulary."""
    return vocab_size + (content_hash + block) % _PAD_ID_RANGE


def cube_segments(item: MediaItem, video: VideoEncoding) -> list[dict[str, float | int]]:
    """Each cube as frame range and timestamps: the event segmentation the paper highlights."""
    stamps = item.timestamps or [float(i) for i in range(item.num_views)]
    return [
        {"start_frame": s, "end_frame": e, "start_time": stamps[s], "end_time": stamps[e - 1]}
        for s, e in video.frame_bounds
    ]


def create_encode_stage(model: torch.nn.Module) -> MultimodalEncodeStage | None:
    """The scheduler's ``mm_encoder`` for ``model``; None for text-only models."""
    return MultimodalEncodeStage(model) if isinstance(model, QuicksviewerForCausalLM) else None


class MultimodalEncodeStage:
    """The scheduler's ``mm_encoder`` for Quicksviewer models."""

    def __init__(self, model: QuicksviewerForCausalLM, cache_bytes: int = 2 << 30) -> None:
        self.model = model
        self.vocab_size = model.config.text_config.vocab_size
        self.num_queries = model.config.num_queries
        param = next(model.vision.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = EncoderCache(cache_bytes)

    @torch.inference_mode()
    def __call__(self, req: Req) -> None:
        processed: ProcessedRequest = req.mm_inputs
        encoded = [self._encode(item) for item in processed.media]
        videos = [enc.video for enc in encoded if enc.video is not None]
        merged_ids = processed.merge_cubes([v.frame_bounds for v in videos])
        req.origin_input_ids, req.mm_mask = self._expand_placeholders(merged_ids, processed.media, encoded)
        req.mm_embeds = torch.cat([enc.blocks.flatten(0, 1) for enc in encoded])
        req.mm_meta = {
            "cubes": [
                cube_segments(item, enc.video)
                for item, enc in zip(processed.media, encoded)
                if enc.video is not None
            ]
        }
        req.mm_inputs = None  # pixels are no longer needed

    def _encode(self, item: MediaItem) -> EncodedMedia:
        key = (item.kind, item.content_hash)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pixels = item.pixel_values.to(self.device, self.dtype)
        if item.kind == "video":
            video = self.model.vision.encode_video(pixels)
            entry = EncodedMedia(video.features, video)
        else:
            entry = EncodedMedia(self.model.vision.encode_images(pixels), None)
        self.cache.put(key, entry)
        return entry

    def _expand_placeholders(
        self, merged_ids: list[int], media: list[MediaItem], encoded: list[EncodedMedia]
    ) -> tuple[list[int], torch.Tensor]:
        pad_ids = [
            pad_token_id(self.vocab_size, item.content_hash, block)
            for item, enc in zip(media, encoded)
            for block in range(enc.blocks.shape[0])
        ]
        num_placeholders = sum(t == IMAGE_PLACEHOLDER_ID for t in merged_ids)
        if num_placeholders != len(pad_ids):
            raise ValueError(
                f"prompt has {num_placeholders} visual placeholders after the cube merge "
                f"but the media produced {len(pad_ids)} feature blocks"
            )
        ids: list[int] = []
        mask: list[bool] = []
        blocks = iter(pad_ids)
        for token in merged_ids:
            if token == IMAGE_PLACEHOLDER_ID:
                ids.extend([next(blocks)] * self.num_queries)
                mask.extend([True] * self.num_queries)
            else:
                ids.append(token)
                mask.append(False)
        return ids, torch.tensor(mask, dtype=torch.bool)
