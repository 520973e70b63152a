"""The engine-side multimodal stage: vision encoding before a request's first prefill.

For a Quicksviewer request it runs the vision encoder on every media item (through an
encoder cache keyed by the item's content hash: ``--mm-encoder-cache-mb`` on the model's
device, 0 disables it), lets cubing decide which timestamp placeholders survive
(``ProcessedRequest.merge_cubes``), and expands each surviving placeholder into
``num_queries`` pad ids. The pad ids lie above the vocabulary and are derived
from the media's content hash, so the radix cache shares a video's KV between requests that
show the same video and never between two different videos.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
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
from cubeserve.server_args import ServerArgs

# Pad ids are vocab_size + a 62-bit value: below 2**63, so they fit the int64 token tensors.
_PAD_ID_BITS = 62
DEFAULT_ENCODER_CACHE_BYTES = ServerArgs.mm_encoder_cache_mb << 20


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


def accepts_media(model: torch.nn.Module) -> bool:
    return isinstance(model, QuicksviewerForCausalLM)


def encoder_cache_bytes(server_args: ServerArgs, model: torch.nn.Module) -> int:
    """Bytes the encoder cache may take on the model's device (``--mm-encoder-cache-mb``);
    0 for text-only models, which have no encode stage."""
    return server_args.mm_encoder_cache_mb << 20 if accepts_media(model) else 0


def create_encode_stage(
    model: torch.nn.Module,
    cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES,
    vision_batch_size: int = ServerArgs.vision_batch_size,
) -> MultimodalEncodeStage | None:
    """The scheduler's ``mm_encoder`` for ``model`` with an encoder cache of ``cache_bytes``
    (0 disables it) and ``vision_batch_size`` frames per vision-tower call; None for
    text-only models. On CUDA the vision encoder is warmed up on one tower batch first."""
    if not accepts_media(model):
        return None
    stage = MultimodalEncodeStage(model, cache_bytes, vision_batch_size)
    if stage.device.type == "cuda":
        model.vision.warm_up(stage.tower_batch)
    return stage


class MultimodalEncodeStage:
    """The scheduler's ``mm_encoder`` for Quicksviewer models."""

    def __init__(
        self,
        model: QuicksviewerForCausalLM,
        cache_bytes: int = DEFAULT_ENCODER_CACHE_BYTES,
        vision_batch_size: int = ServerArgs.vision_batch_size,
    ) -> None:
        self.model = model
        # The tower's own batch: encoding at once or a batch per step gives the same features.
        model.vision.vision_tower.max_batch_size = vision_batch_size
        self.vocab_size = model.config.text_config.vocab_size
        self.num_queries = model.config.num_queries
        param = next(model.vision.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache: ByteBoundedLRU[MediaKey, EncodedMedia] = ByteBoundedLRU(
            cache_bytes, lambda entry: entry.nbytes
        )
        # Media a live job is encoding; a job that is dropped (abort, failure) drops out.
        self.encoding_now: weakref.WeakValueDictionary[MediaKey, EncodeJob] = (
            weakref.WeakValueDictionary()
        )

    @property
    def tower_batch(self) -> int:
        """Views the vision tower encodes per forward; ``EncodeJob.encode_next_batch`` runs one."""
        return self.model.vision.vision_tower.max_batch_size

    def is_encoding(self, key: MediaKey) -> bool:
        return key in self.encoding_now

    def start(self, req: Req) -> EncodeJob:
        """Begin encoding ``req``'s media (see ``EncodeJob``)."""
        return EncodeJob(self, req)

    def __call__(self, req: Req) -> None:
        """All of ``req``'s vision work at once."""
        job = self.start(req)
        job.encode_rest()
        job.finish()

    def encode_features(self, item: MediaItem, features: torch.Tensor) -> EncodedMedia:
        """Cubing (videos), resampler and thumbnail on the tower features of ``item``'s views;
        the result goes into the encoder cache."""
        if item.kind == "video":
            video = self.model.vision.encode_video_features(features)
            entry = EncodedMedia(video.features, video)
        else:
            entry = EncodedMedia(self.model.vision.encode_image_features(features), None)
        self.cache.put(media_key(item), entry)
        return entry

    def apply(self, req: Req, encoded: list[EncodedMedia]) -> None:
        """Give ``req`` its final prompt: cubing decides which timestamp placeholders stay, each
        one left becomes ``num_queries`` pad ids whose embeddings are the feature blocks."""
        processed: ProcessedRequest = req.mm_inputs
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


class EncodeJob:
    """The vision work of one request, which the scheduler spreads over its steps.

    Encodings in the cache are taken at the start. A medium that an earlier job is encoding is
    taken from the cache once that job is done (the scheduler runs jobs first come, first
    served), so concurrent requests showing one new video encode it once, and one that came
    by reference need not be resent; the other media's pixels are read at the start (a
    by-reference medium nobody encodes raises ``MediaNotCachedError`` at once). The vision
    tower runs over their views one tower batch at a time (``encode_next_batch``) or all at
    once (``encode_rest``): the same batches either way, so the same features. A medium whose
    views are all encoded is cubed and resampled at once; ``finish`` builds the request's
    prompt when every medium is done.
    """

    def __init__(self, stage: MultimodalEncodeStage, req: Req) -> None:
        self.stage = stage
        self.req = req
        self.media: list[MediaItem] = req.mm_inputs.media
        self.encoded: list[EncodedMedia | None] = [
            stage.cache.get(media_key(item)) for item in self.media
        ]
        # Uncached media, each encoded once however often the request shows it.
        self._todo: dict[MediaKey, list[int]] = {}
        for i, item in enumerate(self.media):
            if self.encoded[i] is None:
                self._todo.setdefault(media_key(item), []).append(i)
        self._borrowed = {key for key in self._todo if stage.is_encoding(key)}
        for key in self._todo.keys() - self._borrowed:
            self._claim(key)
        self._features: list[torch.Tensor] = []  # tower output of the first medium to do, so far
        self._next_view = 0

    @property
    def done(self) -> bool:
        return not self._todo

    @torch.inference_mode()
    def encode_next_batch(self) -> None:
        if self._todo:
            self._encode_batch()

    @torch.inference_mode()
    def encode_rest(self) -> None:
        # Batch by batch even here: each upload pins one batch of pixels, not a whole video.
        while self._todo:
            self._encode_batch()

    def finish(self) -> None:
        self.stage.apply(self.req, self.encoded)

    def _claim(self, key: MediaKey) -> None:
        self._source(key).take_pixels()
        self.stage.encoding_now[key] = self

    def _source(self, key: MediaKey) -> MediaItem:
        """The request's copy of medium ``key`` that came with pixels, if one did."""
        copies = [self.media[i] for i in self._todo[key]]
        return next((item for item in copies if item.pixels is not None), copies[0])

    def _encode_batch(self) -> None:
        """Run the tower on the next batch of views of the first medium to do."""
        key = next(iter(self._todo))
        if key in self._borrowed:
            self._borrowed.discard(key)
            entry = self.stage.cache.get(key)
            if entry is not None:
                self._complete(key, entry)
                return
            self._claim(key)  # its job failed or it was evicted already: encode it here
        item = self._source(key)
        num_views = len(item.take_pixels())
        end = min(num_views, self._next_view + self.stage.tower_batch)
        pixels = item.pixel_values_on(
            self.stage.device, self.stage.dtype, slice(self._next_view, end)
        )
        self._features.append(self.stage.model.vision.tower_features(pixels))
        self._next_view = end
        if end == num_views:
            features = self._features[0] if len(self._features) == 1 else torch.cat(self._features)
            self._complete(key, self.stage.encode_features(item, features))
            self._features, self._next_view = [], 0

    def _complete(self, key: MediaKey, entry: EncodedMedia) -> None:
        for i in self._todo.pop(key):
            self.encoded[i] = entry
        if self.stage.encoding_now.get(key) is self:
            del self.stage.encoding_now[key]
