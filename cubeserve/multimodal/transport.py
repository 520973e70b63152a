"""How media pixels travel from the frontend to the engine process.

A 7-minute video at 1 fps is ~186 MB of uint8 pixels. Pickled through the ZMQ socket that
carries requests, it costs seconds; so the frontend sends media one of two other ways:

* **by file**: the pixels are written to a file in shared memory (``/dev/shm`` where it
  exists) and the request carries only a ``PixelFile`` naming it; the engine reads it once,
  when it encodes the media, and deletes it. The frontend deletes whatever is left when the
  request ends (a request aborted before the engine read its file).
* **by reference**: media the frontend already sent are sent without pixels at all. The
  engine keeps encodings in its encoder cache keyed by content hash, so a repeat request
  (the next turn of a conversation about the same video) needs no pixels. When the engine has
  evicted the encoding it finishes the request with ``MEDIA_NOT_CACHED``, and the frontend
  resends it by file; the client never sees that.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The finish-reason key by which the engine asks for a request's media pixels.
MEDIA_NOT_CACHED = "media_not_cached"
# Media keys the frontend remembers as held by the engine; a wrong guess costs one resend.
MAX_REMEMBERED_MEDIA = 4096
_SHARED_MEMORY_DIR = Path("/dev/shm")


class MediaNotCachedError(LookupError):
    """A request names media by reference that the engine's encoder cache no longer holds."""


@dataclass(frozen=True)
class PixelFile:
    """A uint8 pixel array written raw to ``path``."""

    path: str
    shape: tuple[int, ...]

    @classmethod
    def write(cls, directory: Path, pixels: np.ndarray) -> PixelFile:
        path = directory / f"{uuid.uuid4().hex}.u8"
        np.ascontiguousarray(pixels, dtype=np.uint8).tofile(path)
        return cls(str(path), tuple(pixels.shape))

    def read_once(self) -> np.ndarray:
        """The pixels; the file is deleted. Raises ``MediaNotCachedError`` when it is gone."""
        try:
            pixels = np.fromfile(self.path, dtype=np.uint8)
        except FileNotFoundError:
            raise MediaNotCachedError(f"media file {self.path} is gone") from None
        Path(self.path).unlink(missing_ok=True)
        return pixels.reshape(self.shape)


# (kind, content hash): the engine's encoder-cache key. The hash covers the exact pixels the
# encoder sees (after frame sampling and resizing), so request options that change them (fps,
# max_frames) give another key, and options that do not (timestamps: prompt text, not encoder
# input) rightly share the entry.
MediaKey = tuple[str, int]


def media_key(item: Any) -> MediaKey:
    return item.kind, item.content_hash


class MediaSender:
    """The frontend's half: turns requests into their wire form and cleans up after them.

    Requests are ``TokenizedGenerateReq``s whose ``mm_inputs`` is a ``ProcessedRequest`` (or
    None). Thread-safe: pixel files are written from worker threads, off the event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directory: Path | None = None  # made at the first pixel file
        self._engine_has: OrderedDict[MediaKey, None] = OrderedDict()
        self._files: dict[str, list[Path]] = {}  # rid -> its pixel files
        self._by_reference: dict[str, Any] = {}  # rid -> the full request, for a resend

    def wire_form(self, req: Any) -> Any:
        """``req`` as sent: media the engine should hold go by reference, the rest by file."""
        if req.mm_inputs is None or not req.mm_inputs.media:
            return req
        with self._lock:
            return self._wire_form(req)

    def _wire_form(self, req: Any) -> Any:
        media = []
        for item in req.mm_inputs.media:
            key = media_key(item)
            if key in self._engine_has:
                self._engine_has.move_to_end(key)
                self._by_reference[req.rid] = req
                media.append(dataclasses.replace(item, pixels=None))
            else:
                media.append(self._by_file(req.rid, item))
        return dataclasses.replace(
            req, mm_inputs=dataclasses.replace(req.mm_inputs, media=media)
        )

    def resend_form(self, rid: str) -> Any | None:
        """The request ``rid`` with all its media by file, after the engine reported its
        encodings gone; None if ``rid`` sent nothing by reference."""
        with self._lock:
            req = self._by_reference.pop(rid, None)
            if req is None:
                return None
            for item in req.mm_inputs.media:
                self._engine_has.pop(media_key(item), None)
            return self._wire_form(req)

    def release(self, rid: str) -> None:
        """``rid`` is over: delete the pixel files the engine did not read."""
        with self._lock:
            self._by_reference.pop(rid, None)
            paths = self._files.pop(rid, [])
        for path in paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None

    def _by_file(self, rid: str, item: Any) -> Any:
        if not isinstance(item.pixels, np.ndarray):
            raise TypeError(f"media of request {rid} has no pixels to send")
        if self._directory is None:
            parent = _SHARED_MEMORY_DIR if _SHARED_MEMORY_DIR.is_dir() else None
            self._directory = Path(tempfile.mkdtemp(prefix="cubeserve-media-", dir=parent))
        pixel_file = PixelFile.write(self._directory, item.pixels)
        self._files.setdefault(rid, []).append(Path(pixel_file.path))
        self._engine_has[media_key(item)] = None
        while len(self._engine_has) > MAX_REMEMBERED_MEDIA:
            self._engine_has.popitem(last=False)
        return dataclasses.replace(item, pixels=pixel_file)

