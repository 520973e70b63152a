"""Video frame sampling and decoding (PyAV), reproducing the original Quicksviewer sampler.

The original reads videos with OpenCV (``opencv_extract_frames_fps(path, num_frames, fps)``).
This module reproduces its frame choice exactly - same frame indices, same timestamps
``round(index / FPS, 1)`` - from the container properties OpenCV would report, but decodes with
PyAV, seeking to the keyframe before each wanted frame when the wanted frames are far apart,
with several threads decoding different stretches of the video at once. Frames that are neither
wanted nor referenced by other frames (most B-frames) are skipped, not decoded; the wanted
frames are bit-identical to a full decode.

Public API
----------
``VideoFrames``: ``frames`` (T,H,W,3) uint8 RGB, ``timestamps`` (seconds, list[float]),
    ``frame_indices`` (list[int]), ``video_fps`` (container rate, None for pre-decoded frames),
    ``size_wh`` (decoded (W, H), also when ``frames`` were squashed while decoding).
``VideoProbe``: ``fps``, ``frame_count`` (as OpenCV's CAP_PROP_FPS / CAP_PROP_FRAME_COUNT),
    ``width``, ``height``, ``codec``.
``sample_frame_indices(frame_count, video_fps, fps=1.0, num_frames=None) -> list[int]``
``frame_timestamps(frame_indices, video_fps) -> list[float]``
``probe_video(source: bytes | str | Path) -> VideoProbe``
``read_video(source, *, fps=1.0, num_frames=None, limits=MediaLimits(), decode_mode="auto",
frame_size=None, max_workers=None) -> VideoFrames``
    Parallel decoding: the wanted frames are split into runs of whole GOPs, each decoded by its
    own container in a thread (``plan_decode_groups``); ``frame_size`` squashes frames to S x S
    in those threads.
``plan_decode_groups(wanted, keyframes, max_groups) -> list[list[int]]``
``frame_digest(frame) -> bytes``, ``frames_content_hash(frames, *, salt=b"", frame_digests=None)``
    -> ``int`` (stable hash of a frame array from its per-frame digests)
``video_from_frames(frames, timestamps=None, *, fps=None, frame_indices=None, limits=...)``
    -> ``VideoFrames`` (pre-decoded frames; without timestamps frame i is at round(i / fps, 1))

All decoding problems raise ``cubeserve.multimodal.media.MediaError``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, NamedTuple

import av
import numpy as np
from PIL import Image

from cubeserve.multimodal.image import available_cpus, media_thread_pool, squash_frame
from cubeserve.multimodal.media import MediaError, MediaLimits, check_pixel_limit, content_hash

# Seek only when it skips at least this many frames past what was already decoded.
_MIN_SEEK_SKIP = 8


@dataclass
class VideoFrames:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: list[float]
    frame_indices: list[int]
    video_fps: float | None = None
    source_size_wh: tuple[int, int] | None = None  # decoded (W, H) when ``frames`` are resized
    # ``frame_digest`` of every frame, when computed while decoding (``read_video(frame_size=)``).
    frame_digests: list[bytes] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size_wh(self) -> tuple[int, int]:
        """(W, H) of the video's frames as decoded."""
        if self.source_size_wh is not None:
            return self.source_size_wh
        return int(self.frames.shape[2]), int(self.frames.shape[1])


@dataclass(frozen=True)
class VideoProbe:
    fps: float
    frame_count: int
    width: int
    height: int
    codec: str


# --------------------------------------------------------------------------- sampling


def sample_frame_indices(
    frame_count: int | float, video_fps: float, fps: float = 1.0, num_frames: int | None = None
) -> list[int]:
    """Frame indices chosen by the original sampler (README 5.13), plus a defined ``fps < 1``.

    ``fps`` is capped at ``video_fps``. Within every block of ``round(video_fps)`` frames the
    original takes ``round(fps)`` frames (half-to-even rounding), each at the middle of its
    ``video_fps / fps`` sub-interval; then ``num_frames`` (if given) keeps that many of those
    candidates spread evenly (each candidate at most once). Indices may reach past the last
    frame; the decoder drops those, as the original does.

    ``fps < 1`` (where the original crashes with ``IndexError``): one frame every ``1 / fps``
    seconds, at the middle of each interval that starts inside the video (index
    ``int(k * step + step / 2)`` with ``step = video_fps / fps``); a video shorter than half an
    interval yields its middle frame.
    """
    if not fps > 0:
        raise MediaError(f"video fps must be positive, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise MediaError(f"num_frames (max_frames) must be at least 1, got {num_frames}")
    if not video_fps > 0 or frame_count < 1:
        return []
    fps = min(fps, video_fps)
    if round(fps) == 0:
        candidates = _one_frame_every(frame_count, video_fps / fps)
    else:
        candidates = [
            int(i + j * video_fps / fps + video_fps / fps / 2)
            for i in range(0, int(frame_count - 1) + 1, max(1, round(video_fps)))
            for j in range(round(fps))
        ]
    if num_frames is None:
        return candidates
    gap = len(candidates) / num_frames
    keep = sorted({int(p * gap + gap / 2) for p in range(num_frames)})
    return [candidates[p] for p in keep]


def _one_frame_every(frame_count: int | float, step: float) -> list[int]:
    indices = []
    k = 0
    while k * step < frame_count:
        index = int(k * step + step / 2)
        if index < frame_count:
            indices.append(index)
        k += 1
    return indices or [int((frame_count - 1) / 2)]


def frame_timestamps(frame_indices: Sequence[int], video_fps: float) -> list[float]:
    return [round(index / video_fps, 1) for index in frame_indices]


# --------------------------------------------------------------------------- probing


def probe_video(source: bytes | str | os.PathLike) -> VideoProbe:
    """Container properties as OpenCV reports them (``frame_count`` is 0 when the container has
    neither a frame count nor a duration; ``read_video`` then counts the packets)."""
    with _open_container(source) as container:
        return _probe(container, _video_stream(container))


def _probe(container: av.container.InputContainer, stream: av.VideoStream) -> VideoProbe:
    """Frame rate and count the way OpenCV's FFmpeg backend computes CAP_PROP_FPS / FRAME_COUNT."""
    fps = _rate(stream.average_rate) or _rate(stream.guessed_rate) or _rate(stream.base_rate)
    if not fps and stream.time_base:
        fps = 1.0 / float(stream.time_base)
    frame_count = stream.frames
    if not frame_count:
        duration = (container.duration or 0) / av.time_base
        if duration <= 0 and stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        frame_count = math.floor(duration * fps + 0.5)
    return VideoProbe(
        fps=fps,
        frame_count=int(frame_count),
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        codec=stream.codec_context.name,
    )


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as exc:
        raise MediaError(f"the video is corrupt or truncated: {exc}") from None


def _rate(value: Fraction | None) -> float:
    return float(value) if value else 0.0


# --------------------------------------------------------------------------- decoding


def read_video(
    source: bytes | str | os.PathLike,
    *,
    fps: float = 1.0,
    num_frames: int | None = None,
    limits: MediaLimits = MediaLimits(),
    decode_mode: Literal["auto", "sequential"] = "auto",
    frame_size: int | None = None,
    max_workers: int | None = None,
) -> VideoFrames:
    """Sample and decode frames of an encoded video (raw bytes or a local path).

    ``decode_mode="auto"`` splits the wanted frames into runs of whole GOPs that up to
    ``max_workers`` threads (default: the available CPUs) decode at once, each with its own
    container seeking to its run's first keyframe, and falls back to plain sequential decoding
    (frame number = decode order, like OpenCV) whenever the stream's timestamps are irregular;
    ``"sequential"`` always decodes from the first frame, in the calling thread. Both give
    bit-identical frames.

    ``frame_size``: squash each frame to ``frame_size`` x ``frame_size`` (``resize_frames``'s
    bicubic) and take its ``frame_digest`` in the thread that decoded it, so this work overlaps
    decoding and the full-size frames are never all held at once; ``size_wh`` still reports
    the decoded size.
    """
    with _open_container(source) as container:
        stream = _video_stream(container)
        probe = _probe(container, stream)
        check_pixel_limit(probe.width, probe.height, limits, what="video frame")
        counted = probe.frame_count < 1  # neither a frame count nor a duration in the container
        if counted:
            probe = dataclasses.replace(probe, frame_count=_count_packets(container, stream))
        wanted = sorted(set(sample_frame_indices(probe.frame_count, probe.fps, fps, num_frames)))
        if len(wanted) > limits.max_video_frames:
            raise MediaError(
                f"sampling the video at fps={fps} gives {len(wanted)} frames, more than the "
                f"limit of {limits.max_video_frames}; lower fps or set max_frames"
            )
        convert = _FrameConverter(frame_size, wanted)
        decoded = None
        if decode_mode == "auto" and not counted:
            workers = max_workers or available_cpus()
            decoded = _try_decode_seeking(
                source, container, stream, probe, wanted, convert, workers
            )
    if decoded is None:
        # A fresh array: threads of an abandoned seeking run may still be writing the old one.
        convert = _FrameConverter(frame_size, wanted)
        with _open_container(source) as container:
            decoded = _decode_sequential(
                container, _video_stream(container), probe, wanted, convert
            )

    indices = [i for i in wanted if i in decoded]
    if not indices:
        raise MediaError("the video has no decodable frames")
    return VideoFrames(
        frames=convert.stacked(indices),
        timestamps=frame_timestamps(indices, probe.fps),
        frame_indices=indices,
        video_fps=probe.fps,
        source_size_wh=convert.size_wh,
        frame_digests=None if frame_size is None else [decoded[i].digest for i in indices],
    )


def frame_digest(frame: np.ndarray) -> bytes:
    """8-byte BLAKE2b digest of one frame's pixel bytes."""
    return hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=8).digest()


def frames_content_hash(
    frames: np.ndarray, *, salt: bytes = b"", frame_digests: Sequence[bytes] | None = None
) -> int:
    """Stable 63-bit hash of a (T,H,W,C) frame array: of its dtype, shape and the frames'
    ``frame_digest``s, which ``read_video(frame_size=...)`` computes in its decoding threads
    (``VideoFrames.frame_digests``); computed here when not given."""
    if frame_digests is None:
        frame_digests = [frame_digest(frame) for frame in frames]
    if len(frame_digests) != len(frames):
        raise ValueError(f"{len(frame_digests)} digests for {len(frames)} frames")
    header = f"frames:{frames.dtype.str}:{frames.shape}:".encode()
    return content_hash(b"".join(frame_digests), salt=salt + header)


class _Decoded(NamedTuple):
    """A wanted frame, stored in its row of ``_FrameConverter.frames``."""

    digest: bytes | None  # ``frame_digest`` of the row when squashed


class _FrameConverter:
    """Decoded frame -> upright RGB array, squashed to ``frame_size`` (and digested) if given;
    remembers the decoded (W, H). Shared by decoding threads: a stream's frames share a size.

    Each wanted frame lands in its row of one (len(wanted), H, W, 3) array (``frames``), in the
    thread that decoded it: stacking 420 frames afterwards was a serial 186 MB copy.
    """

    def __init__(self, frame_size: int | None, wanted: Sequence[int]) -> None:
        self.frame_size = frame_size
        self.size_wh: tuple[int, int] | None = None
        self.rows = {index: row for row, index in enumerate(wanted)}
        self.frames: np.ndarray | None = None
        self._allocating = threading.Lock()

    def __call__(self, frame: av.VideoFrame, index: int) -> _Decoded:
        rgb = _to_rgb(frame)
        self.size_wh = (rgb.shape[1], rgb.shape[0])
        pixels = rgb if self.frame_size is None else squash_frame(rgb, self.frame_size)
        row = self._output(pixels.shape)[self.rows[index]]
        row[...] = pixels
        return _Decoded(None if self.frame_size is None else frame_digest(row))

    def stacked(self, indices: list[int]) -> np.ndarray:
        """The frames of ``indices`` (all decoded) as one array; no copy when all were."""
        assert self.frames is not None
        if len(indices) == len(self.rows):
            return self.frames
        return self.frames[[self.rows[i] for i in indices]]

    def _output(self, frame_shape: tuple[int, ...]) -> np.ndarray:
        with self._allocating:
            if self.frames is None:
                self.frames = np.empty((len(self.rows), *frame_shape), dtype=np.uint8)
        if self.frames.shape[1:] != frame_shape:
            raise MediaError(
                f"the video's frame size changes mid-stream ({self.frames.shape[1:]} -> "
                f"{frame_shape}); not supported"
            )
        return self.frames


def _open_container(source: bytes | str | os.PathLike) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray)):
        target = io.BytesIO(source)
    else:
        # "file:" makes FFmpeg treat the name as a plain local path, never as a protocol or URL.
        target = "file:" + str(Path(source).resolve())
    try:
        return av.open(target, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(
            f"cannot open video (unsupported, truncated or corrupt data): {exc}"
        ) from None


def _video_stream(container: av.container.InputContainer, codec_threads: int = 0) -> av.VideoStream:
    """The first video stream, decoded with ``codec_threads`` FFmpeg threads (0: one per core)."""
    if not container.streams.video:
        raise MediaError("the data contains no video stream (not a video, or empty or truncated)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = codec_threads
    return stream


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    # OpenCV applies the display-matrix rotation by default; do the same.
    clockwise = (-round(frame.rotation or 0)) % 360
    if clockwise in (90, 180, 270):
        rgb = np.ascontiguousarray(np.rot90(rgb, k=-clockwise // 90))
    return rgb


def _missing_is_truncation(missing: int, probe: VideoProbe) -> bool:
    """A wanted frame well inside the reported length that never decodes means lost data.

    Indices near the end can be missing legitimately (the original drops them silently, and
    a frame count estimated from the duration can be a little off).
    """
    return missing < probe.frame_count - max(2, round(probe.fps))


def _decode_sequential(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    probe: VideoProbe,
    wanted: list[int],
    convert: _FrameConverter,
) -> dict[int, _Decoded]:
    """Decode from the start; frame number = position in decode output (OpenCV semantics)."""
    remaining = set(wanted)
    decoded: dict[int, _Decoded] = {}
    count = 0
    try:
        for count, frame in enumerate(container.decode(stream), start=1):
            index = count - 1
            if index in remaining:
                decoded[index] = convert(frame, index)
                remaining.discard(index)
                if not remaining:
                    return decoded
    except av.FFmpegError as exc:
        raise MediaError(f"the video is corrupt or truncated: {exc}") from None
    if count == 0:
        raise MediaError("the video has no decodable frames")
    lost = [i for i in remaining if _missing_is_truncation(i, probe)]
    if lost:
        raise MediaError(
            f"the video is truncated or corrupt: it ends after {count} frames but reports "
            f"{probe.frame_count}"
        )
    return decoded


# ---- seeking and parallel decoding


class _IrregularStream(Exception):
    """Timestamps do not map to frame numbers reliably: decode sequentially instead."""


class _Overshoot(Exception):
    pass


class _FrameClock:
    """Frame numbers from presentation timestamps: ``(pts - start) * time_base * fps``."""

    def __init__(self, stream: av.VideoStream, probe: VideoProbe) -> None:
        self.fps = probe.fps
        self.scale = stream.time_base * Fraction(probe.fps).limit_denominator(1_000_000)
        self.start = stream.start_time or 0

    def exact_index(self, pts: int) -> Fraction:
        return (pts - self.start) * self.scale

    def frame_number(self, pts: int | None) -> int | None:
        """The number of the frame presented at ``pts``; None when ``pts`` is unknown or lies
        between frames."""
        if pts is None:
            return None
        exact = self.exact_index(pts)
        number = round(exact)
        return number if abs(exact - number) <= Fraction(1, 4) else None

    def frames_to_pts(self, index: int) -> int:
        return self.start + math.floor(index / self.scale)


def keyframe_indices(stream: av.VideoStream, clock: _FrameClock) -> list[int]:
    """Keyframe numbers from the container index (mp4/mov; may be empty); planning hints only.

    Index entries carry decode times, which run ahead of presentation by the B-frame delay;
    the stream's first keyframe is shown first, so shifting it to frame 0 removes the delay.
    """
    try:
        stamps = [entry.timestamp for entry in stream.index_entries if entry.is_keyframe]
    except (AttributeError, av.FFmpegError, TypeError):
        return []
    indices = sorted(round(clock.exact_index(ts)) for ts in stamps)
    delay = -indices[0] if indices and indices[0] < 0 else 0
    return [index + delay for index in indices]


def plan_decode_groups(
    wanted: Sequence[int], keyframes: Sequence[int], max_groups: int
) -> list[list[int]]:
    """Split the sorted ``wanted`` frame numbers into at most ``max_groups`` contiguous groups
    of whole GOPs, balancing the frames each group decodes (from a GOP's keyframe to its last
    wanted frame). Without keyframes there is one group."""
    gops: list[tuple[int, list[int]]] = []  # (keyframe, wanted frames in its GOP)
    for frame in wanted:
        k = bisect.bisect_right(keyframes, frame) - 1
        keyframe = keyframes[k] if k >= 0 else 0
        if gops and gops[-1][0] == keyframe:
            gops[-1][1].append(frame)
        else:
            gops.append((keyframe, [frame]))
    num_groups = min(max_groups, len(gops)) if keyframes else 1
    if num_groups <= 1:
        return [list(wanted)]
    costs = [frames[-1] - keyframe + 1 for keyframe, frames in gops]
    target = sum(costs) / num_groups
    groups: list[list[int]] = [[]]
    done = 0
    for (_, frames), cost in zip(gops, costs, strict=True):
        # A GOP goes to the next group when most of its work lies past this group's share.
        if groups[-1] and done + cost / 2 > target * len(groups) and len(groups) < num_groups:
            groups.append([])
        groups[-1].extend(frames)
        done += cost
    return groups


class _SeekingReader:
    """Decodes the ``wanted`` frames, seeking to the keyframe before a frame when that skips
    work, and skipping the non-reference frames that are not wanted.

    Frame numbers come from presentation timestamps (``_FrameClock``) and are checked to
    advance by exactly one per frame, counting the frames the decoder skipped; anything else
    raises ``_IrregularStream`` so the caller falls back to sequential decoding.
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.VideoStream,
        clock: _FrameClock,
        keyframes: list[int],
        wanted: Sequence[int],
        convert: _FrameConverter,
    ) -> None:
        self.container = container
        self.stream = stream
        self.clock = clock
        self.keyframes = keyframes
        self.wanted = frozenset(wanted)
        self.convert = convert
        self.frames: Iterator[av.VideoFrame] | None = None
        self.position = -1  # number of the last frame taken from ``frames``
        self.after_seek = False
        self.fed: set[int] = set()  # frame numbers of the packets fed to the decoder

    def index_of(self, frame: av.VideoFrame) -> int:
        index = self.clock.frame_number(frame.pts)
        if index is None:
            raise _IrregularStream
        return index

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames decoded from the current demuxing position on (flushed at end of stream).

        A packet of a frame that is not wanted is decoded with ``skip_frame="NONREF"``: the
        decoder drops it when no other frame references it, which changes no other frame.
        Packets without a frame number are decoded fully, so their frames get checked.
        """
        codec = self.stream.codec_context
        # Some decoders read skip_frame only when opened (libdav1d): open them skipping nothing.
        codec.skip_frame = "DEFAULT"
        codec.open(strict=False)
        for packet in self.container.demux(self.stream):
            number = self.clock.frame_number(packet.pts)
            if number is not None:
                # A frame number seen twice, or behind the frames already out, would shift
                # OpenCV's count (decode order) against ours even when its frame is dropped.
                if number in self.fed or number <= self.position:
                    raise _IrregularStream
                self.fed.add(number)
            skip = number is not None and number not in self.wanted
            codec.skip_frame = "NONREF" if skip else "DEFAULT"
            yield from codec.decode(packet)

    def follows(self, index: int) -> bool:
        """Whether frame ``index`` is the next after the last one taken, but for frames between
        them that were not wanted (so may have been skipped)."""
        return index > self.position and all(
            number in self.fed and number not in self.wanted
            for number in range(self.position + 1, index)
        )

    def should_seek(self, target: int) -> bool:
        if self.keyframes:
            k = bisect.bisect_right(self.keyframes, target) - 1
            keyframe = self.keyframes[k] if k >= 0 else 0
            return keyframe > self.position + _MIN_SEEK_SKIP
        return target - self.position > max(64, 4 * round(self.clock.fps))

    def seek(self, target: int) -> None:
        pts = self.clock.frames_to_pts(target)
        self.container.seek(
            max(pts, self.clock.start), stream=self.stream, backward=True, any_frame=False
        )
        self._restart(after_seek=True)

    def start_from_beginning(self) -> None:
        self._restart(after_seek=False)

    def _restart(self, *, after_seek: bool) -> None:
        self.frames = self._decode()
        self.position = -1
        self.after_seek = after_seek
        self.fed = set()

    def read(self, target: int) -> _Decoded | None:
        """The frame numbered ``target``; None at end of stream. Raises _Overshoot after a seek
        that landed past ``target``."""
        for frame in self.frames:
            if self.after_seek:
                # Frames before the first keyframe after a seek may be undecodable leftovers.
                if not frame.key_frame:
                    continue
                index = self.index_of(frame)
                self.after_seek = False
                if index > target:
                    raise _Overshoot
            else:
                index = self.index_of(frame)
                if not self.follows(index):
                    raise _IrregularStream
            self.position = index
            if index == target:
                return self.convert(frame, index)
            if index > target:
                raise _IrregularStream
        if self.after_seek:  # no keyframe at all after the seek
            raise _IrregularStream
        return None


def _try_decode_seeking(
    source: bytes | str | os.PathLike,
    container: av.container.InputContainer,
    stream: av.VideoStream,
    probe: VideoProbe,
    wanted: list[int],
    convert: _FrameConverter,
    max_workers: int,
) -> dict[int, _Decoded] | None:
    """Decoded frames, or None when the stream needs sequential decoding to be numbered right.

    PyAV releases the GIL while demuxing, decoding and converting, so the groups' threads run
    in parallel; the CPUs left over go to FFmpeg's own threads in each group's decoder.
    """
    if not wanted or not probe.fps or stream.time_base is None:
        return None
    keyframes = keyframe_indices(stream, _FrameClock(stream, probe))
    groups = plan_decode_groups(wanted, keyframes, max_workers)
    if len(groups) == 1:
        return _decode_group(container, stream, probe, keyframes, wanted, convert)
    codec_threads = max(1, max_workers // len(groups))
    futures = [
        media_thread_pool().submit(
            _decode_group_in_own_container, source, codec_threads, probe, keyframes, group, convert
        )
        for group in groups
    ]
    decoded: dict[int, _Decoded] = {}
    for future in futures:
        frames = future.result()
        if frames is None:
            for pending in futures:
                pending.cancel()
            return None
        decoded.update(frames)
    return decoded


def _decode_group_in_own_container(
    source: bytes | str | os.PathLike,
    codec_threads: int,
    probe: VideoProbe,
    keyframes: list[int],
    wanted: list[int],
    convert: _FrameConverter,
) -> dict[int, _Decoded] | None:
    with _open_container(source) as container:
        stream = _video_stream(container, codec_threads)
        return _decode_group(container, stream, probe, keyframes, wanted, convert)


def _decode_group(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    probe: VideoProbe,
    keyframes: list[int],
    wanted: list[int],
    convert: _FrameConverter,
) -> dict[int, _Decoded] | None:
    reader = _SeekingReader(
        container, stream, _FrameClock(stream, probe), keyframes, wanted, convert
    )
    try:
        return _decode_seeking(reader, probe, wanted)
    except (_IrregularStream, av.FFmpegError):
        return None


def _decode_seeking(
    reader: _SeekingReader, probe: VideoProbe, wanted: list[int]
) -> dict[int, _Decoded] | None:
    decoded: dict[int, _Decoded] = {}
    for target in wanted:
        if reader.should_seek(target):
            frame = _seek_and_read(reader, target)
        else:
            if reader.frames is None:
                reader.start_from_beginning()
            frame = reader.read(target)
        if frame is None:  # end of stream: every later target is missing too
            if _missing_is_truncation(target, probe):
                return None  # let the sequential decoder judge the damage
            break
        decoded[target] = frame
    return decoded


def _seek_and_read(reader: _SeekingReader, target: int) -> _Decoded | None:
    """Seek to the keyframe before ``target`` and decode up to it.

    Seeking by timestamp can land on a keyframe presented after the target (B-frame
    reordering); then seek again from further back.
    """
    back = 0
    while True:
        reader.seek(max(0, target - back))
        try:
            return reader.read(target)
        except _Overshoot:
            if target - back <= 0:
                raise _IrregularStream from None
            back = max(2 * back, round(reader.clock.fps), 1)


# --------------------------------------------------------------------------- pre-decoded


def video_from_frames(
    frames: np.ndarray | Sequence[np.ndarray | Image.Image],
    timestamps: Sequence[float] | None = None,
    *,
    fps: float | None = None,
    frame_indices: Sequence[int] | None = None,
    limits: MediaLimits = MediaLimits(),
) -> VideoFrames:
    """Wrap already-decoded RGB frames (uint8 (T,H,W,3) array, or a list of arrays / PIL images).

    Without ``timestamps`` frame i gets ``round(i / fps, 1)`` seconds (``fps`` defaults to 1),
    matching the one-decimal timestamps the sampler writes into prompts.
    """
    array = _stack_frames(frames)
    num = array.shape[0]
    if num == 0:
        raise MediaError("the video has no frames")
    if num > limits.max_video_frames:
        raise MediaError(
            f"the video has {num} frames, more than the limit of {limits.max_video_frames}"
        )
    check_pixel_limit(array.shape[2], array.shape[1], limits, what="video frame")
    if timestamps is None:
        rate = 1.0 if fps is None else float(fps)
        if not rate > 0:
            raise MediaError(f"video fps must be positive, got {fps}")
        timestamps = [round(i / rate, 1) for i in range(num)]
    if len(timestamps) != num:
        raise MediaError(f"the video has {num} frames but {len(timestamps)} timestamps")
    indices = list(range(num)) if frame_indices is None else [int(i) for i in frame_indices]
    if len(indices) != num:
        raise MediaError(f"the video has {num} frames but {len(indices)} frame indices")
    return VideoFrames(
        frames=array,
        timestamps=[float(t) for t in timestamps],
        frame_indices=indices,
        video_fps=None if fps is None else float(fps),
    )


def _stack_frames(frames: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        array = frames
    else:
        try:
            array = np.stack(
                [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames]
            )
        except ValueError as exc:
            raise MediaError(f"video frames must all have the same size: {exc}") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise MediaError(
            f"video frames must be uint8 RGB (T,H,W,3), got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array)
