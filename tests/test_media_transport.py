"""Media pixels between the frontend and the engine: by file, by reference, resent on a miss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cubeserve.engine.io_struct import TokenizedGenerateReq
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.multimodal import transport
from cubeserve.multimodal.processors.quicksviewer import MediaItem, ProcessedRequest
from cubeserve.multimodal.transport import MediaNotCachedError, MediaSender, PixelFile


def media_item(seed: int, frames: int = 3) -> MediaItem:
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8)
    return MediaItem(
        kind="video", pixels=pixels, content_hash=1000 + seed, image_sizes=[(8, 8)] * frames,
        num_views=frames,
    )


def request(rid: str, *items: MediaItem) -> TokenizedGenerateReq:
    processed = ProcessedRequest(prompt="p", input_ids=[1, 2], media=list(items))
    return TokenizedGenerateReq(rid, [1, 2], SamplingParams(), mm_inputs=processed)


def test_pixel_file_round_trip_reads_once(tmp_path: Path) -> None:
    pixels = media_item(0).pixels
    pixel_file = PixelFile.write(tmp_path, pixels)
    np.testing.assert_array_equal(pixel_file.read_once(), pixels)
    assert not Path(pixel_file.path).exists()
    with pytest.raises(MediaNotCachedError):
        pixel_file.read_once()


def test_first_send_goes_by_file_and_repeats_by_reference() -> None:
    sender = MediaSender()
    item = media_item(1)
    first = sender.wire_form(request("a", item))
    second = sender.wire_form(request("b", item))
    (sent_first,), (sent_second,) = first.mm_inputs.media, second.mm_inputs.media
    assert isinstance(sent_first.pixels, PixelFile)
    np.testing.assert_array_equal(sent_first.pixels.read_once(), item.pixels)
    assert sent_second.pixels is None
    assert sent_second.content_hash == item.content_hash
    assert isinstance(item.pixels, np.ndarray)  # the caller's request is left alone
    sender.close()


def test_resend_after_a_miss_sends_the_pixels_again() -> None:
    sender = MediaSender()
    item = media_item(2)
    sender.wire_form(request("a", item))
    by_reference = sender.wire_form(request("b", item))
    assert by_reference.mm_inputs.media[0].pixels is None
    resent = sender.resend_form("b")
    assert isinstance(resent.mm_inputs.media[0].pixels, PixelFile)
    assert sender.resend_form("b") is None  # one resend per miss
    # The request is over: nothing is kept for a resend.
    sender.wire_form(request("c", item))
    sender.release("c")
    assert sender.resend_form("c") is None
    sender.close()


def test_release_deletes_unread_files_and_close_the_directory() -> None:
    sender = MediaSender()
    sent = sender.wire_form(request("a", media_item(3), media_item(4)))
    paths = [Path(item.pixels.path) for item in sent.mm_inputs.media]
    assert all(path.exists() for path in paths)
    directory = paths[0].parent
    sender.release("a")
    assert not any(path.exists() for path in paths)
    sender.close()
    assert not directory.exists()


def test_text_requests_pass_unchanged() -> None:
    sender = MediaSender()
    req = TokenizedGenerateReq("t", [1, 2, 3], SamplingParams())
    assert sender.wire_form(req) is req


def test_remembered_media_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MAX_REMEMBERED_MEDIA", 2)
    sender = MediaSender()
    items = [media_item(seed) for seed in (5, 6, 7)]
    for i, item in enumerate(items):
        sender.wire_form(request(f"r{i}", item))
    again = sender.wire_form(request("again", items[0]))  # forgotten: the oldest of three
    assert isinstance(again.mm_inputs.media[0].pixels, PixelFile)
    sender.close()


def test_media_item_without_pixels_raises_media_not_cached() -> None:
    item = dataclasses.replace(media_item(8), pixels=None)
    with pytest.raises(MediaNotCachedError):
        item.pixel_values_on(torch.device("cpu"), torch.float32)
