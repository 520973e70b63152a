"""The engine-side multimodal stage: vision encoding before a request's first prefill.

For a Quicksviewer request it runs the vision encoder on every media item (through an
encoder cache keyed by the item's content hash), lets cubing decide which timestamp
placeholders survive (``ProcessedRequest.merge_cubes``), and expands each surviving
placeholder into ``num_queries`` pad ids. The pad ids lie above the vocabulary and are derived
from the media's content hash, so the radix cache shares a video's KV between requests that
show the same video and never between two different videos.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from cubeserve.models.quicksviewer import QuicksviewerForCausalLM
from cubeserve.models.quicksviewer_vision import VideoEncoding
from cubeserve.multimodal.cache import ByteBoundedLRU
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    MediaItem,
    ProcessedRequest,
)
from cubeserve.multimodal.transport import MediaKey, media_key
from cubeserve.scheduler.request import Req

# Pad ids are vocab_size + a 62-bit value: below 2**63, so they fit the int64 token tensors.
_PAD_ID_BITS = 62
DEFAULT_ENCODER_CACHE_BYTES = 2 << 30


@dataclass
class EncodedMedia:
    blocks: torch.Tensor  # (num_blocks, num_queries, hidden), in placeholder order
    video: VideoEncoding | None  # cubing result, videos only

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()


def pad_token_id(vocab_size: int, content_hash: int, block: int) -> int:
    """Id standing for block ``block`` of the media with ``content_hash``; above the vocabulary.

    The radix cache keys KV by token ids alone, so equal pad ids at one position after an
    identical prefix share KV even if their embeddings differ. Every (content, block) pair
    therefore gets an independent 62-bit hash: two different media (in one request or in two)
    collide with probability ~2**-62 per pair of blocks, where ``hash + block`` would give
    media with nearby hashes overlapping id ranges.
    """
    digest = hashlib.blake2b(
        struct.pack("<QQ", content_hash, block), digest_size=8, person=b"cubeserve-pad"
    ).digest()
    return vocab_size + (int.from_bytes(digest, "little") >> (64 - _PAD_ID_BITS))


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

    def __init__(
        self, model: QuicksviewerForCausalLM, cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES
    ) -> None:
        self.model = model
        self.vocab_size = model.config.text_config.vocab_size
        self.num_queries = model.config.num_queries
        param = next(model.vision.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache: ByteBoundedLRU[MediaKey, EncodedMedia] = ByteBoundedLRU(
            cache_bytes, lambda entry: entry.nbytes
        )

    @torch.inference_mode()
    def __call__(self, req: Req) -> None:
        processed: ProcessedRequest = req.mm_inputs
        encoded = [self._encode(item) for item in processed.media]
        videos = [enc.video for enc in encoded if enc.video is not None]
        merged_ids = processed.merge_cubes([v.frame_bounds for v in videos])
        req.origin_input_ids, req.mm_mask = self._expand_placeholders(
            merged_ids, processed.media, encoded
        )
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
        key = media_key(item)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pixels = item.pixel_values_on(self.device, self.dtype)
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
