"""Media pixels between the frontend and the engine: by file, by reference, resent on a miss."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cubeserve.engine.io_struct import TokenizedGenerateReq
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.engine.tokenizer_manager import TokenizerManager
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


def send(sender: MediaSender, req: TokenizedGenerateReq) -> TokenizedGenerateReq:
    """The wire form of ``req``, sent (as the tokenizer manager does)."""
    wire = sender.wire_form(req)
    sender.sent(wire)
    return wire


def pixels_sent(wire: TokenizedGenerateReq) -> list[Any]:
    return [item.pixels for item in wire.mm_inputs.media]


def test_pixel_file_round_trip_reads_once(tmp_path: Path) -> None:
    pixels = media_item(0).pixels
    pixel_file = PixelFile.write(tmp_path, pixels)
    np.testing.assert_array_equal(pixel_file.read_once(), pixels)
    assert not Path(pixel_file.path).exists()
    with pytest.raises(MediaNotCachedError):
        pixel_file.read_once()


def test_pixels_read_from_a_file_are_writable_and_outlive_its_name(tmp_path: Path) -> None:
    """The engine maps the file (no read copy): its name goes at once, the pixels stay valid
    and can be handed to torch as a writable array."""
    pixels = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pixel_file = PixelFile.write(tmp_path, pixels)
    read = pixel_file.read_once()
    assert not Path(pixel_file.path).exists() and read.flags.writeable
    np.testing.assert_array_equal(torch.from_numpy(read[1:]).numpy(), pixels[1:])
    empty = PixelFile.write(tmp_path, np.zeros((0, 8, 8, 3), dtype=np.uint8)).read_once()
    assert empty.shape == (0, 8, 8, 3) and not list(tmp_path.iterdir())


def test_first_send_goes_by_file_and_repeats_by_reference() -> None:
    sender = MediaSender()
    item = media_item(1)
    first = send(sender, request("a", item))
    second = send(sender, request("b", item))
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
    send(sender, request("a", item))
    by_reference = send(sender, request("b", item))
    assert by_reference.mm_inputs.media[0].pixels is None
    resent = sender.resend_form("b")
    assert isinstance(resent.mm_inputs.media[0].pixels, PixelFile)
    sender.sent(resent)
    assert sender.resend_form("b") is None  # one resend per miss: the resend is all by file
    # The request is over: nothing is kept for a resend.
    send(sender, request("c", item))
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
        send(sender, request(f"r{i}", item))
    again = send(sender, request("again", items[0]))  # forgotten: the oldest of three
    assert isinstance(again.mm_inputs.media[0].pixels, PixelFile)
    sender.close()


def test_media_item_without_pixels_raises_media_not_cached() -> None:
    item = dataclasses.replace(media_item(8), pixels=None)
    with pytest.raises(MediaNotCachedError):
        item.pixel_values_on(torch.device("cpu"), torch.float32)


def test_media_are_held_by_the_engine_only_once_sent() -> None:
    sender = MediaSender()
    item = media_item(9)
    abandoned = sender.wire_form(request("a", item))
    (path,) = [Path(p.path) for p in pixels_sent(abandoned)]
    sender.abandon(abandoned)  # never sent: its file goes, and the engine does not hold it
    assert not path.exists()
    assert isinstance(pixels_sent(send(sender, request("b", item)))[0], PixelFile)
    assert pixels_sent(send(sender, request("c", item))) == [None]
    sender.close()


def test_a_video_shown_twice_goes_twice_by_file_until_sent() -> None:
    sender = MediaSender()
    item = media_item(10)
    first, second = pixels_sent(send(sender, request("a", item, item)))
    assert isinstance(first, PixelFile) and isinstance(second, PixelFile)
    assert first.path != second.path  # the engine deletes a file once it has read it
    assert pixels_sent(send(sender, request("b", item, item))) == [None, None]
    sender.close()


def test_without_an_engine_cache_everything_goes_by_file() -> None:
    sender = MediaSender(by_reference=False)
    item = media_item(11)
    for rid in "ab":
        (pixels,) = pixels_sent(send(sender, request(rid, item)))
        assert isinstance(pixels, PixelFile)
        assert sender.resend_form(rid) is None  # nothing referenced: a miss is not resent
    sender.close()


class BlockedWrites:
    """``PixelFile.write`` patched to block, once started, until ``proceed`` is set."""

    def __init__(self) -> None:
        self.count = 0  # writes started
        self.proceed = threading.Event()
        self._started = threading.Semaphore(0)

    def write(self, original: Any, directory: Path, pixels: np.ndarray) -> PixelFile:
        self.count += 1
        self._started.release()
        assert self.proceed.wait(60), "the test never let the write proceed"
        return original(directory, pixels)

    def wait_started(self, count: int) -> bool:
        """Whether ``count`` more writes start (each within a generous bound, no timing)."""
        return all(self._started.acquire(timeout=30) for _ in range(count))


@pytest.fixture
def blocked_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedWrites]:
    blocked = BlockedWrites()
    original = PixelFile.write
    monkeypatch.setattr(
        transport.PixelFile, "write", staticmethod(lambda d, p: blocked.write(original, d, p))
    )
    yield blocked
    blocked.proceed.set()  # a failing test must not leave threads blocked


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def test_pixel_files_of_different_media_are_written_concurrently(blocked_writes) -> None:
    sender = MediaSender()
    items = [media_item(12), media_item(13)]
    threads = [in_thread(sender.wire_form, request(f"r{i}", item)) for i, item in enumerate(items)]
    # Both writes are under way at once: the first one, blocked, holds no lock the second needs.
    assert blocked_writes.wait_started(2), "the second write waited for the first"
    blocked_writes.proceed.set()
    for thread, result in threads:
        thread.join(30)
        (pixels,) = pixels_sent(result[0])
        assert isinstance(pixels, PixelFile)
    sender.close()


def concurrent_sends(
    sender: MediaSender, blocked_writes: Any, item: MediaItem
) -> tuple[list[Any], threading.Thread, list[Any]]:
    """Request "a" starts writing ``item``'s pixels, "b" showing it too starts meanwhile, then
    a's write completes. Returns a's result, b's thread and b's result (still being made)."""
    first_thread, first = in_thread(sender.wire_form, request("a", item))
    assert blocked_writes.wait_started(1)
    second_thread, second = in_thread(sender.wire_form, request("b", item))
    blocked_writes.proceed.set()
    first_thread.join(30)
    return first, second_thread, second


def test_same_new_media_sent_concurrently_is_referenced_only_after_the_first_send(
    blocked_writes,
) -> None:
    sender = MediaSender()
    first, second_thread, second = concurrent_sends(sender, blocked_writes, media_item(14))
    (pixels,) = pixels_sent(first[0])
    assert isinstance(pixels, PixelFile)
    # The first request is written but not sent: a reference could overtake its pixels.
    assert second_thread.is_alive() and not second
    sender.sent(first[0])
    second_thread.join(30)
    assert pixels_sent(second[0]) == [None]
    assert blocked_writes.count == 1  # the pixels were written once
    sender.close()


def test_a_request_waiting_for_abandoned_media_sends_them_itself(blocked_writes) -> None:
    sender = MediaSender()
    first, second_thread, second = concurrent_sends(sender, blocked_writes, media_item(15))
    assert second_thread.is_alive() and not second
    sender.abandon(first[0])  # e.g. its client went away before it was sent
    second_thread.join(30)
    (pixels,) = pixels_sent(second[0])
    assert isinstance(pixels, PixelFile) and Path(pixels.path).exists()
    assert not Path(pixels_sent(first[0])[0].path).exists()
    sender.close()


def test_releasing_a_request_never_sent_frees_its_waiters(blocked_writes) -> None:
    blocked_writes.proceed.set()
    sender = MediaSender()
    item = media_item(16)
    unsent = sender.wire_form(request("a", item))  # neither sent nor abandoned
    second_thread, second = in_thread(sender.wire_form, request("b", item))
    sender.release("a")
    second_thread.join(30)
    assert isinstance(pixels_sent(second[0])[0], PixelFile)
    assert not Path(pixels_sent(unsent)[0].path).exists()
    sender.close()


def test_a_request_cancelled_while_its_pixels_are_written_is_abandoned(
    blocked_writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer manager's consumer goes away mid-write: once written, the request is
    abandoned (file deleted, media no longer in flight), so the next one does not wait."""
    monkeypatch.setattr(transport, "IN_FLIGHT_WAIT_S", 3600.0)
    sender = MediaSender()
    manager = TokenizerManager.__new__(TokenizerManager)  # only its media sending is used
    manager._media = sender
    item = media_item(17)

    async def cancel_mid_write() -> bool:
        """Whether the media stop being in flight once the write is done (waiting up to a
        generous bound for the write's thread and then the event loop)."""
        cancelled = asyncio.create_task(
            manager._media_wire_form(sender.wire_form, request("a", item))
        )
        assert await asyncio.to_thread(blocked_writes.wait_started, 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        blocked_writes.proceed.set()
        for _ in range(3000):
            if not sender._in_flight:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(cancel_mid_write()), "the cancelled request was never abandoned"
        thread, following = in_thread(sender.wire_form, request("b", item))
        thread.join(30)
        (pixels,) = pixels_sent(following[0])
        assert isinstance(pixels, PixelFile)
        # "a" was written, then abandoned (its file deleted); "b" wrote its own.
        assert blocked_writes.count == 2
        assert list(Path(pixels.path).parent.iterdir()) == [Path(pixels.path)]
    finally:
        sender.close()  # frees a waiter left behind by a failure


def test_full_shared_memory_spills_pixel_files_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's small /dev/shm fills up: the pixels go through a disk file instead of
    failing the request, and no partial file is left in shared memory."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(transport, "_SHARED_MEMORY_DIR", shm)
    monkeypatch.setattr(transport.tempfile, "tempdir", str(tmp_path / "disk"))
    (tmp_path / "disk").mkdir()
    real_tofile = np.ndarray.tofile

    class FullSharedMemory(np.ndarray):
        def tofile(self, path, *args, **kwargs):  # type: ignore[override]
            if Path(path).parent.parent == shm:
                Path(path).write_bytes(b"partial")
                raise OSError(28, "No space left on device")
            return real_tofile(self, path, *args, **kwargs)

    def contiguous(array: np.ndarray, dtype: Any = None) -> np.ndarray:
        return np.asarray(array, dtype).view(FullSharedMemory)

    monkeypatch.setattr(transport.np, "ascontiguousarray", contiguous)
    sender = MediaSender()
    item = media_item(0)
    wire = send(sender, request("a", item))
    (pixel_file,) = pixels_sent(wire)
    assert Path(pixel_file.path).parent.parent == tmp_path / "disk"
    assert not any(path.is_file() for path in shm.rglob("*"))  # the partial file is gone
    np.testing.assert_array_equal(pixel_file.read_once(), item.pixels)
    sender.close()
    assert not any((tmp_path / "disk").iterdir()) and not any(shm.iterdir())


def test_other_write_errors_are_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "_SHARED_MEMORY_DIR", tmp_path)

    def failing(directory: Path, pixels: np.ndarray) -> PixelFile:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(PixelFile, "write", failing)
    sender = MediaSender()
    with pytest.raises(PermissionError):
        send(sender, request("a", media_item(0)))
    sender.close()
