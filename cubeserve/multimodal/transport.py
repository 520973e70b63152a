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
  resends it by file; the client never sees that. A resend goes all by file, so a request is
  resent at most once. With the encoder cache off (``--mm-encoder-cache-mb 0``) nothing goes
  by reference.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
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
# How long a request waits for another one that is sending the same new media before it sends
# its own copy (a safety net: the other request is sent or abandoned as soon as it is written).
IN_FLIGHT_WAIT_S = 60.0
_SHARED_MEMORY_DIR = Path("/dev/shm")

logger = logging.getLogger(__name__)


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
        try:
            np.ascontiguousarray(pixels, dtype=np.uint8).tofile(path)
        except BaseException:
            path.unlink(missing_ok=True)  # a partial file, e.g. the device filled up
            raise
        return cls(str(path), tuple(pixels.shape))

    def read_once(self) -> np.ndarray:
        """The pixels; the file is deleted. Raises ``MediaNotCachedError`` when it is gone.

        The file is mapped, not read: its shared-memory pages are copied once, when a batch of
        them goes to the device, and freed when the array is dropped (the name goes now).
        """
        try:
            if math.prod(self.shape) == 0:  # an empty file cannot be mapped
                pixels = np.empty(self.shape, dtype=np.uint8)
            else:  # copy-on-write: writable for torch.from_numpy, and nothing is ever written
                pixels = np.memmap(self.path, dtype=np.uint8, mode="c", shape=self.shape)
        except FileNotFoundError:
            raise MediaNotCachedError(f"media file {self.path} is gone") from None
        Path(self.path).unlink(missing_ok=True)
        return pixels


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
    None). ``by_reference`` False (the engine keeps no encodings: ``--mm-encoder-cache-mb 0``)
    sends every media item by file.

    Protocol: each request ``wire_form`` or ``resend_form`` returns goes to ``sent`` once it is
    on the engine's socket, or to ``abandon`` if it never will be; ``release`` when the request
    is over.

    Thread-safe, and made to be called from worker threads. The lock guards the bookkeeping
    only: pixel files are written outside it, so requests with different new media write them
    in parallel. A media item is remembered as held by the engine only once a request carrying
    its pixels was ``sent`` (the engine reads its socket in order, so a reference sent later
    finds the encoding unless it was evicted meanwhile). Until then the item is *in flight*:
    a concurrent request showing it waits for that send (or abandon) and then goes by
    reference, so the pixels are written once and no reference overtakes them.
    """

    def __init__(self, by_reference: bool = True) -> None:
        self.by_reference = by_reference
        self._lock = threading.Lock()
        self._directory: Path | None = None  # made at the first pixel file
        self._spill_directory: Path | None = None  # on disk, made when shared memory is full
        self._engine_has: OrderedDict[MediaKey, None] = OrderedDict()
        # Media whose pixels some request is writing or about to send; set once it is sent
        # (or abandoned).
        self._in_flight: dict[MediaKey, threading.Event] = {}
        # id(wire request) -> (that request, the media it put in flight), until sent/abandon.
        self._claims: dict[int, tuple[Any, dict[MediaKey, threading.Event]]] = {}
        self._files: dict[str, list[Path]] = {}  # rid -> its pixel files
        self._by_reference: dict[str, Any] = {}  # rid -> the full request, for a resend

    def wire_form(self, req: Any) -> Any:
        """``req`` as sent: media the engine should hold go by reference, the rest by file."""
        if req.mm_inputs is None or not req.mm_inputs.media:
            return req
        return self._wire_form(req, all_by_file=False)

    def resend_form(self, rid: str) -> Any | None:
        """The request ``rid`` with all its media by file, after the engine reported its
        encodings gone; None if ``rid`` sent nothing by reference (so a miss is resent at most
        once: the resend itself references nothing)."""
        with self._lock:
            req = self._by_reference.pop(rid, None)
            if req is None:
                return None
            for item in req.mm_inputs.media:
                self._engine_has.pop(media_key(item), None)
        return self._wire_form(req, all_by_file=True)

    def sent(self, wire: Any) -> None:
        """``wire`` (from ``wire_form`` / ``resend_form``) is on the engine's socket: its media
        sent by file are now held by the engine."""
        with self._lock:
            _, claims = self._claims.pop(id(wire), (None, {}))
            for key in claims:
                self._engine_has[key] = None
                self._engine_has.move_to_end(key)
            while len(self._engine_has) > MAX_REMEMBERED_MEDIA:
                self._engine_has.popitem(last=False)
            self._settle(claims)

    def abandon(self, wire: Any) -> None:
        """``wire`` will not be sent: its pixel files are deleted and its media no longer in
        flight."""
        with self._lock:
            _, claims = self._claims.pop(id(wire), (None, {}))
            self._settle(claims)
        if wire.mm_inputs is not None:
            for item in wire.mm_inputs.media:
                if isinstance(item.pixels, PixelFile):
                    Path(item.pixels.path).unlink(missing_ok=True)

    def release(self, rid: str) -> None:
        """``rid`` is over: delete the pixel files the engine did not read."""
        with self._lock:
            self._by_reference.pop(rid, None)
            paths = self._files.pop(rid, [])
            for key, (wire, claims) in list(self._claims.items()):  # never sent nor abandoned
                if wire.rid == rid:
                    del self._claims[key]
                    self._settle(claims)
        for path in paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for event in self._in_flight.values():
                event.set()
            self._in_flight.clear()
            self._claims.clear()
            for directory in (self._directory, self._spill_directory):
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
            self._directory = self._spill_directory = None

    def _wire_form(self, req: Any, all_by_file: bool) -> Any:
        media = req.mm_inputs.media
        while True:
            with self._lock:
                plan = self._plan(req.rid, media, all_by_file)
                if isinstance(plan, threading.Event):
                    in_flight = plan
                else:
                    by_file, claims = plan
                    directory = self._commit(req, media, by_file, claims)
                    break
            # Another request is sending these pixels: once it has, go by reference.
            if not in_flight.wait(IN_FLIGHT_WAIT_S):
                all_by_file = True  # it is stuck: send our own copy
        wire_media: list[Any] = []
        written: list[Path] = []
        try:  # the slow part, outside the lock
            for item, file in zip(media, by_file):
                if file:
                    pixel_file = self._write(directory, item.pixels)
                    written.append(Path(pixel_file.path))
                    wire_media.append(dataclasses.replace(item, pixels=pixel_file))
                else:
                    wire_media.append(dataclasses.replace(item, pixels=None))
        except BaseException:
            with self._lock:
                self._settle(claims)
            for path in written:
                path.unlink(missing_ok=True)
            raise
        wire = dataclasses.replace(
            req, mm_inputs=dataclasses.replace(req.mm_inputs, media=wire_media)
        )
        with self._lock:
            self._files.setdefault(req.rid, []).extend(written)
            self._claims[id(wire)] = (wire, claims)
        return wire

    def _write(self, directory: Path, pixels: np.ndarray) -> PixelFile:
        """A pixel file in ``directory``, or on disk when that is shared memory and full
        (containers often get only 64 MB of /dev/shm)."""
        try:
            return PixelFile.write(directory, pixels)
        except OSError as err:
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            if not full or directory.parent != _SHARED_MEMORY_DIR:
                raise
        with self._lock:
            if self._spill_directory is None:
                self._spill_directory = Path(tempfile.mkdtemp(prefix="cubeserve-media-"))
                logger.warning(
                    "%s is full: media pixels go through %s on disk, which is slower; give "
                    "the server more shared memory (docker run --shm-size)",
                    _SHARED_MEMORY_DIR,
                    self._spill_directory,
                )
            spill = self._spill_directory
        return PixelFile.write(spill, pixels)

    def _plan(
        self, rid: str, media: list[Any], all_by_file: bool
    ) -> tuple[list[bool], dict[MediaKey, threading.Event]] | threading.Event:
        """Under the lock, changing nothing: per item whether it goes by file, and the media
        this request puts in flight; or the event of media in flight to wait for first
        (never with ``all_by_file``)."""
        by_file: list[bool] = []
        claims: dict[MediaKey, threading.Event] = {}
        for item in media:
            key = media_key(item)
            # No engine cache to refer to; or shown twice in this request, and the engine reads
            # (and deletes) each file once.
            if not self.by_reference or key in claims:
                file = True
            elif not all_by_file and key in self._engine_has:
                file = False
            else:
                in_flight = self._in_flight.get(key)
                if in_flight is not None and not all_by_file:
                    return in_flight
                if in_flight is None:
                    claims[key] = threading.Event()
                file = True
            if file and not isinstance(item.pixels, np.ndarray):
                raise TypeError(f"media of request {rid} has no pixels to send")
            by_file.append(file)
        return by_file, claims

    def _commit(
        self,
        req: Any,
        media: list[Any],
        by_file: list[bool],
        claims: dict[MediaKey, threading.Event],
    ) -> Path | None:
        """Under the lock: record ``_plan``'s decision; returns the pixel file directory."""
        self._in_flight.update(claims)
        for item, file in zip(media, by_file):
            if not file:
                self._engine_has.move_to_end(media_key(item))
        if not all(by_file):
            self._by_reference[req.rid] = req
        if any(by_file) and self._directory is None:
            parent = _SHARED_MEMORY_DIR if _SHARED_MEMORY_DIR.is_dir() else None
            self._directory = Path(tempfile.mkdtemp(prefix="cubeserve-media-", dir=parent))
        return self._directory

    def _settle(self, claims: dict[MediaKey, threading.Event]) -> None:
        """Under the lock: ``claims`` are no longer in flight; their waiters look again."""
        for key, event in claims.items():
            if self._in_flight.get(key) is event:
                del self._in_flight[key]
            event.set()
