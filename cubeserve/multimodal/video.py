"""Video frame sampling and decoding (PyAV), reproducing the original Quicksviewer sampler.

The original reads videos with OpenCV (``opencv_extract_frames_fps(path, num_frames, fps)``).
This module reproduces its frame choice exactly - same frame indices, same timestamps
``round(index / FPS, 1)`` - from the container properties OpenCV would report, but decodes with
PyAV, seeking to the keyframe before each wanted frame when the wanted frames are far apart.

Public API
----------
``VideoFrames``: ``frames`` (T,H,W,3) uint8 RGB, ``timestamps`` (seconds, list[float]),
    ``frame_indices`` (list[int]), ``video_fps`` (container rate, None for pre-decoded frames).
``VideoProbe``: ``fps``, ``frame_count`` (as OpenCV's CAP_PROP_FPS / CAP_PROP_FRAME_COUNT),
    ``width``, ``height``, ``codec``.
``sample_frame_indices(frame_count, video_fps, fps=1.0, num_frames=None) -> list[int]``
``frame_timestamps(frame_indices, video_fps) -> list[float]``
``probe_video(source: bytes | str | Path) -> VideoProbe``
``read_video(source, *, fps=1.0, num_frames=None, limits=MediaLimits(), decode_mode="auto")``
    -> ``VideoFrames``
``video_from_frames(frames, timestamps=None, *, fps=None, frame_indices=None, limits=...)``
    -> ``VideoFrames`` (pre-decoded frames; without timestamps frame i is at round(i / fps, 1))

All decoding problems raise ``cubeserve.multimodal.media.MediaError``.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

from cubeserve.multimodal.media import MediaError, MediaLimits, check_pixel_limit

# Seek only when it skips at least this many frames past what was already decoded.
_MIN_SEEK_SKIP = 8


@dataclass
class VideoFrames:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: list[float]
    frame_indices: list[int]
    video_fps: float | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size_wh(self) -> tuple[int, int]:
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
) -> VideoFrames:
    """Sample and decode frames of an encoded video (raw bytes or a local path).

    ``decode_mode="auto"`` seeks to keyframes when wanted frames are sparse and falls back to
    plain sequential decoding (frame number = decode order, like OpenCV) whenever the stream's
    timestamps are irregular; ``"sequential"`` always decodes from the first frame.
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
        decoded = None
        if decode_mode == "auto" and not counted:
            decoded = _try_decode_seeking(container, stream, probe, wanted)
    if decoded is None:
        with _open_container(source) as container:
            decoded = _decode_sequential(container, _video_stream(container), probe, wanted)

    indices = [i for i in wanted if i in decoded]
    if not indices:
        raise MediaError("the video has no decodable frames")
    return VideoFrames(
        frames=np.stack([decoded[i] for i in indices]),
        timestamps=frame_timestamps(indices, probe.fps),
        frame_indices=indices,
        video_fps=probe.fps,
    )


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


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        raise MediaError("the data contains no video stream (not a video, or empty or truncated)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
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
) -> dict[int, np.ndarray]:
    """Decode from the start; frame number = position in decode output (OpenCV semantics)."""
    remaining = set(wanted)
    decoded: dict[int, np.ndarray] = {}
    count = 0
    try:
        for count, frame in enumerate(container.decode(stream), start=1):
            index = count - 1
            if index in remaining:
                decoded[index] = _to_rgb(frame)
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


class _IrregularStream(Exception):
    """Timestamps do not map to frame numbers reliably: decode sequentially instead."""


class _SeekingReader:
    """Decodes wanted frames, seeking to the keyframe before a frame when that skips work.

    Frame numbers come from presentation timestamps, ``(pts - start) * time_base * fps``, and
    are checked to advance by exactly one per decoded frame; anything else raises
    ``_IrregularStream`` so the caller falls back to sequential decoding.
    """

    def __init__(
        self, container: av.container.InputContainer, stream: av.VideoStream, probe: VideoProbe
    ) -> None:
        self.container = container
        self.stream = stream
        self.fps = Fraction(probe.fps).limit_denominator(1_000_000)
        self.time_base = stream.time_base
        self.start = stream.start_time or 0
        self.keyframes = _keyframe_indices(stream, self._index_of_pts)
        self.frames: Iterator[av.VideoFrame] | None = None
        self.position = -1  # number of the last frame taken from ``frames``
        self.after_seek = False

    def _index_of_pts(self, pts: int) -> Fraction:
        return (pts - self.start) * self.time_base * self.fps

    def index_of(self, frame: av.VideoFrame) -> int:
        if frame.pts is None:
            raise _IrregularStream
        exact = self._index_of_pts(frame.pts)
        index = round(exact)
        if abs(exact - index) > Fraction(1, 4):
            raise _IrregularStream
        return index

    def should_seek(self, target: int) -> bool:
        if self.keyframes:
            k = bisect.bisect_right(self.keyframes, target) - 1
            keyframe = self.keyframes[k] if k >= 0 else 0
            return keyframe > self.position + _MIN_SEEK_SKIP
        return target - self.position > max(64, 4 * round(self.fps))

    def seek(self, target: int) -> None:
        pts = self.start + math.floor(Fraction(target) / self.fps / self.time_base)
        self.container.seek(
            max(pts, self.start), stream=self.stream, backward=True, any_frame=False
        )
        self.frames = iter(self.container.decode(self.stream))
        self.position = -1
        self.after_seek = True

    def start_from_beginning(self) -> None:
        self.frames = iter(self.container.decode(self.stream))
        self.position = -1
        self.after_seek = False

    def read(self, target: int) -> np.ndarray | None:
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
                if index != self.position + 1:
                    raise _IrregularStream
            self.position = index
            if index == target:
                return _to_rgb(frame)
            if index > target:
                raise _IrregularStream
        if self.after_seek:  # no keyframe at all after the seek
            raise _IrregularStream
        return None


class _Overshoot(Exception):
    pass


def _keyframe_indices(stream: av.VideoStream, index_of_pts) -> list[int]:
    """Keyframe numbers from the container index (mp4/mov; may be empty); planning hints only."""
    try:
        entries = stream.index_entries
        return sorted(round(index_of_pts(e.timestamp)) for e in entries if e.is_keyframe)
    except (AttributeError, av.FFmpegError, TypeError):
        return []


def _try_decode_seeking(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    probe: VideoProbe,
    wanted: list[int],
) -> dict[int, np.ndarray] | None:
    """Decoded frames, or None when the stream needs sequential decoding to be numbered right."""
    if not wanted or not probe.fps or stream.time_base is None:
        return None
    try:
        return _decode_seeking(_SeekingReader(container, stream, probe), probe, wanted)
    except (_IrregularStream, av.FFmpegError):
        return None


def _decode_seeking(
    reader: _SeekingReader, probe: VideoProbe, wanted: list[int]
) -> dict[int, np.ndarray] | None:
    decoded: dict[int, np.ndarray] = {}
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


def _seek_and_read(reader: _SeekingReader, target: int) -> np.ndarray | None:
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
            back = max(2 * back, round(reader.fps), 1)


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
