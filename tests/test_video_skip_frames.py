"""Seeking decoding skips the non-reference frames it does not want (``skip_frame="NONREF"``):
the frames it returns stay bit-identical to sequential decoding, the skipped frames never come
out of the decoder, and streams whose timestamps do not number their frames exactly still fall
back to sequential decoding."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, NamedTuple

import av
import numpy as np
import pytest
from test_multimodal_processor import decode_index, index_pattern

from cubeserve.multimodal import video as video_module
from cubeserve.multimodal.video import read_video, sample_frame_indices

RATE, NUM_FRAMES = 25, 100
HEIGHT, WIDTH = 64, 96
needs_libx264 = pytest.mark.skipif("libx264" not in av.codecs_available, reason="no libx264")


def encode(
    *, gop: int, options: dict[str, str] | None = None, codec: str = "libx264", fmt: str = "mp4"
) -> bytes:
    """NUM_FRAMES frames at RATE fps of a random texture panning under frame i's number
    (``index_pattern``, read back by ``decode_index``), keyframes exactly every ``gop`` frames.

    The moving texture leaves every predicted frame real motion and residuals to decode, so a
    frame predicted from a wrongly skipped reference cannot come out right by chance."""
    rng = np.random.default_rng(0)
    # 4x4-pixel blocks, enough to pan NUM_FRAMES pixels right and NUM_FRAMES / 2 down.
    blocks = ((HEIGHT + NUM_FRAMES // 2) // 4 + 1, (WIDTH + NUM_FRAMES) // 4 + 1, 3)
    texture = rng.integers(0, 256, blocks, np.uint8).repeat(4, 0).repeat(4, 1)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"sc_threshold": "0", **(options or {})}  # no scene-cut keyframes
        for i in range(NUM_FRAMES):
            pixels = np.ascontiguousarray(texture[i // 2 : i // 2 + HEIGHT, i : i + WIDTH])
            pixels[:48, :64] = index_pattern(i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


STREAMS: dict[str, dict[str, Any]] = {
    "x264-gop8": {"gop": 8, "options": {"bf": "3"}},  # x264's default B-pyramid
    "x264-one-gop": {"gop": NUM_FRAMES, "options": {"bf": "3"}},  # decoded without seeking
    "x264-no-pyramid": {"gop": 30, "options": {"bf": "2", "x264-params": "b-pyramid=none"}},
    "x264-open-gop": {"gop": 30, "options": {"bf": "3", "x264-params": "open-gop=1"}},
    "x264-no-b-frames": {"gop": 30, "options": {"bf": "0"}},
    "x264-matroska": {"gop": 30, "options": {"bf": "3"}, "fmt": "matroska"},
    "mpeg4-b-frames": {"gop": 30, "options": {"bf": "2"}, "codec": "mpeg4"},
}
_rng = np.random.default_rng(0)
PATTERNS: dict[str, list[int]] = {
    "every frame": list(range(NUM_FRAMES)),
    "1 fps": sample_frame_indices(NUM_FRAMES, RATE, 1),
    "3 fps": sample_frame_indices(NUM_FRAMES, RATE, 3),
    "random sparse": sorted(int(i) for i in _rng.choice(NUM_FRAMES, 5, replace=False)),
    "random dense": sorted(int(i) for i in _rng.choice(NUM_FRAMES, 40, replace=False)),
    "first": [0],
    "last": [NUM_FRAMES - 1],
    "first and last": [0, NUM_FRAMES - 1],
}


class Clip(NamedTuple):
    data: bytes
    frames: np.ndarray  # every frame, decoded sequentially


@functools.cache
def clip(name: str) -> Clip:
    data = encode(**STREAMS[name])
    return Clip(data, read_video(data, fps=RATE, decode_mode="sequential").frames)


def stream_params() -> list[Any]:
    return [
        pytest.param(name, id=name, marks=needs_libx264 if name.startswith("x264") else ())
        for name in STREAMS
    ]


@pytest.fixture
def seeking_results(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each ``read_video`` in auto mode: whether the seeking decoder decoded the frames
    (False: it fell back to sequential decoding)."""
    results: list[bool] = []
    try_decode_seeking = video_module._try_decode_seeking

    def recorded(*args: Any) -> dict[int, video_module._Decoded] | None:
        decoded = try_decode_seeking(*args)
        results.append(decoded is not None)
        return decoded

    monkeypatch.setattr(video_module, "_try_decode_seeking", recorded)
    return results


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("max_workers", [1, 3])
@pytest.mark.parametrize("name", stream_params())
def test_skipping_gives_the_frames_of_sequential_decoding(
    name: str, max_workers: int, seeking_results: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = clip(name)
    assert [decode_index(frame) for frame in reference.frames] == list(range(NUM_FRAMES))
    for pattern, wanted in PATTERNS.items():
        monkeypatch.setattr(video_module, "sample_frame_indices", lambda *_, w=wanted: w)
        # 1 worker: one group, FFmpeg's frame threads; 3: up to 3 groups of whole GOPs, each in
        # its own container, seeking within the group.
        video = read_video(reference.data, max_workers=max_workers)
        assert video.frame_indices == wanted, pattern
        assert np.array_equal(video.frames, reference.frames[wanted]), pattern
    assert seeking_results == [True] * len(PATTERNS)


# --------------------------------------------------------------------------- frames skipped


class Sample(NamedTuple):
    data: bytes
    pts: int
    dts: int
    key: bool


class Packets(NamedTuple):
    samples: list[Sample]  # the video packets, in decode order
    ticks: int  # time-base ticks of one frame
    non_reference: set[int]  # numbers of the frames no other frame references


def packets_of(data: bytes) -> Packets:
    """The packets of an H.264 mp4; non-reference frames are those whose slices have
    nal_ref_idc 0 (NALs prefixed by 4-byte lengths)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        samples = [
            Sample(bytes(p), p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size
        ]
        ticks = round(1 / (stream.time_base * RATE))
    non_reference: set[int] = set()
    for sample in samples:
        offset = 0
        while offset + 4 < len(sample.data):
            header = sample.data[offset + 4]
            if header & 0x1F in (1, 5):  # a slice of a (non-)IDR picture
                if header >> 5 == 0:
                    non_reference.add(sample.pts // ticks)
                break
            offset += 4 + int.from_bytes(sample.data[offset : offset + 4], "big")
    return Packets(samples, ticks, non_reference)


@needs_libx264
@pytest.mark.parametrize("codec_threads", [1, 3])
def test_unwanted_non_reference_frames_are_not_decoded(
    codec_threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = clip("x264-one-gop")
    video_stream = video_module._video_stream
    monkeypatch.setattr(
        video_module, "_video_stream", lambda container, _=0: video_stream(container, codec_threads)
    )
    out_of_decoder: list[int] = []
    decode = video_module._SeekingReader._decode

    def counted(reader: video_module._SeekingReader) -> Iterator[av.VideoFrame]:
        for frame in decode(reader):
            out_of_decoder.append(reader.index_of(frame))
            yield frame

    monkeypatch.setattr(video_module._SeekingReader, "_decode", counted)
    video = read_video(reference.data, fps=1, max_workers=1)
    last = video.frame_indices[-1]
    skippable = set(range(last)) & packets_of(reference.data).non_reference
    skippable -= set(video.frame_indices)
    assert len(skippable) > last / 3
    # Every other frame up to the last wanted one, the referenced ones included, comes out.
    assert [n for n in out_of_decoder if n <= last] == sorted(set(range(last + 1)) - skippable)
    assert np.array_equal(video.frames, reference.frames[video.frame_indices])


# --------------------------------------------------------------------------- irregular streams


def first_non_reference(packets: Packets) -> Sample:
    """The first non-reference frame from frame 50 on: between two wanted frames at 1 fps."""
    number = min(n for n in packets.non_reference if n >= 50)
    return next(s for s in packets.samples if s.pts == number * packets.ticks)


def drop_a_non_reference_frame(packets: Packets) -> list[Sample]:
    dropped = first_non_reference(packets)
    return [s for s in packets.samples if s != dropped]


def timestamp_gap(packets: Packets) -> list[Sample]:
    gap = 3 * packets.ticks
    return [
        s._replace(pts=s.pts + gap) if s.pts >= 50 * packets.ticks else s for s in packets.samples
    ]


def jittered_reference_frame(packets: Packets) -> list[Sample]:
    # Unlike a non-reference frame, a reference frame is decoded whether wanted or not.
    number = min(n for n in range(50, NUM_FRAMES) if n not in packets.non_reference)
    half = packets.ticks // 2
    return [
        s._replace(pts=s.pts + half) if s.pts == number * packets.ticks else s
        for s in packets.samples
    ]


def duplicate_timestamp(packets: Packets) -> list[Sample]:
    moved = first_non_reference(packets)
    return [s._replace(pts=s.pts + packets.ticks) if s == moved else s for s in packets.samples]


def repeat_a_non_reference_frame(packets: Packets, pts_shift: int = 0) -> list[Sample]:
    """The first non-reference frame from frame 50 on decoded twice, its copy ``pts_shift``
    ticks later; the last non-reference frame, past the last wanted frame, goes to keep the
    frame count. With both copies skipped no frame number would be missing, but the decode
    order counts one frame more."""
    repeated = first_non_reference(packets)
    dropped = max(packets.non_reference) * packets.ticks
    edited: list[Sample] = []
    for sample in packets.samples:
        if sample.pts != dropped:
            edited.append(sample)
        if sample == repeated:
            edited.append(sample._replace(pts=sample.pts + pts_shift, dts=sample.dts + 1))
    return edited


def off_grid_non_reference_frame(packets: Packets) -> list[Sample]:
    # Numbered by no timestamp, the copy must be decoded (and so noticed), never skipped.
    return repeat_a_non_reference_frame(packets, packets.ticks // 2)


def remux(data: bytes, edit: Callable[[Packets], list[Sample]]) -> bytes:
    """``data`` (H.264 mp4) remuxed with its packets edited, into Matroska: its frame rate
    stays exact however the timestamps change, so only the seeking decoder's own checks can
    notice."""
    target = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(target, "w", format="matroska") as out:
        template = source.streams.video[0]
        stream = out.add_stream_from_template(template)
        for sample in edit(packets_of(data)):
            packet = av.Packet(sample.data)
            packet.stream, packet.time_base = stream, template.time_base
            packet.pts, packet.dts, packet.is_keyframe = sample.pts, sample.dts, sample.key
            out.mux(packet)
    return target.getvalue()


@needs_libx264
@pytest.mark.parametrize(
    "edit",
    [
        drop_a_non_reference_frame,
        timestamp_gap,
        off_grid_non_reference_frame,
        jittered_reference_frame,
        duplicate_timestamp,
        repeat_a_non_reference_frame,
    ],
    ids=lambda edit: edit.__name__,
)
def test_irregular_streams_fall_back_to_sequential_decoding(
    edit: Callable[[Packets], list[Sample]], seeking_results: list[bool]
) -> None:
    # One GOP: the reader decodes the whole stretch up to each wanted frame, no seeks past the
    # edit; so one group whatever max_workers.
    data = remux(clip("x264-one-gop").data, edit)
    sequential = read_video(data, fps=1, decode_mode="sequential")
    auto = read_video(data, fps=1, max_workers=1)
    assert seeking_results == [False]
    assert auto.frame_indices == sequential.frame_indices
    assert np.array_equal(auto.frames, sequential.frames)


# --------------------------------------------------------------------------- decoder opening


@pytest.mark.skipif(
    not {"libsvtav1", "libdav1d"} <= av.codecs_available, reason="needs SVT-AV1 and dav1d"
)
def test_decoders_reading_skip_frame_only_when_opened_still_seek(
    seeking_results: list[bool],
) -> None:
    """libdav1d takes skip_frame when opened; opened skipping, it would drop wanted frames."""
    av1 = encode(gop=30, codec="libsvtav1")
    sequential = read_video(av1, fps=1, decode_mode="sequential")
    seeking = read_video(av1, fps=1, max_workers=1)
    assert seeking_results == [True]
    assert seeking.frame_indices == sequential.frame_indices == [12, 37, 62, 87]
    assert np.array_equal(seeking.frames, sequential.frames)
