"""The fast video path: parallel GOP decoding, resizing while decoding, uint8 media items."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_multimodal_processor import (
    CASES,
    GOLDEN,
    decode_index,
    encode_video,
    golden_messages,
    h264_codec,
    load_case,
    needs_golden,
    processor_for,
)

from cubeserve.multimodal import video as video_module
from cubeserve.multimodal.image import PixelNormalization, normalize_pixels, resize_frames
from cubeserve.multimodal.media import MediaError
from cubeserve.multimodal.video import (
    frame_digest,
    frames_content_hash,
    plan_decode_groups,
    read_video,
    video_from_frames,
)


def keyframes_of(data: bytes) -> list[int]:
    with video_module._open_container(data) as container:
        stream = video_module._video_stream(container)
        clock = video_module._FrameClock(stream, video_module._probe(container, stream))
        return video_module.keyframe_indices(stream, clock)


@pytest.fixture(scope="module")
def several_gops() -> bytes:
    """300 frames at 25 fps in GOPs of 30, with B-frames when libx264 is available."""
    codec = h264_codec()
    options = {"bf": "3"} if codec == "libx264" else {}
    return encode_video(300, codec=codec, gop=30, options=options)


# --------------------------------------------------------------------------- parallel decoding


def test_parallel_decoding_is_bit_identical_to_sequential(
    several_gops: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(several_gops)
    keyframes = keyframes_of(several_gops)
    assert keyframes[:3] == [0, 30, 60]
    for fps, num_frames in [(1, None), (2, None), (25, None), (0.3, None), (3, 7)]:
        sequential = read_video(
            several_gops, fps=fps, num_frames=num_frames, decode_mode="sequential"
        )
        assert len(plan_decode_groups(sequential.frame_indices, keyframes, 4)) > 1
        for source in (several_gops, path):
            parallel = read_video(source, fps=fps, num_frames=num_frames, max_workers=4)
            assert parallel.frame_indices == sequential.frame_indices
            assert parallel.timestamps == sequential.timestamps
            assert np.array_equal(parallel.frames, sequential.frames)
        assert [decode_index(f) for f in sequential.frames] == sequential.frame_indices


def test_frames_are_squashed_in_the_decoding_threads(several_gops: bytes) -> None:
    full = read_video(several_gops, fps=2, max_workers=3)
    squashed = read_video(several_gops, fps=2, max_workers=3, frame_size=20)
    assert squashed.frames.shape == (full.num_frames, 20, 20, 3)
    assert np.array_equal(squashed.frames, resize_frames(full.frames, 20))
    assert squashed.size_wh == full.size_wh == (64, 48)
    rotated = read_video(encode_video(30, rotation=90), fps=1, frame_size=16)
    assert rotated.frames.shape[1:] == (16, 16, 3) and rotated.size_wh == (48, 64)


def test_plan_decode_groups_splits_at_gop_boundaries() -> None:
    keyframes = list(range(0, 1000, 50))
    wanted = list(range(10, 1000, 25))
    groups = plan_decode_groups(wanted, keyframes, 4)
    assert len(groups) == 4
    assert [frame for group in groups for frame in group] == wanted
    for earlier, later in itertools.pairwise(groups):
        assert earlier[-1] // 50 < later[0] // 50  # no GOP is decoded by two groups
    decoded = [group[-1] - group[0] // 50 * 50 + 1 for group in groups]
    assert max(decoded) <= 1.3 * min(decoded)
    # Never more groups than GOPs holding wanted frames; without an index, one group.
    assert len(plan_decode_groups([5, 60, 70], keyframes, 8)) == 2
    assert plan_decode_groups(wanted, [], 8) == [wanted]
    assert plan_decode_groups(wanted, keyframes, 1) == [wanted]


# --------------------------------------------------------------------------- hashing, pixels


def test_frames_content_hash_follows_the_content() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    reference = frames_content_hash(frames, salt=b"video")
    assert reference == frames_content_hash(frames.copy(), salt=b"video")
    assert 0 <= reference < 2**63
    changed = frames.copy()
    changed[-1, -1, -1, -1] ^= 1
    assert frames_content_hash(changed, salt=b"video") != reference
    assert frames_content_hash(frames, salt=b"image") != reference
    assert frames_content_hash(frames.reshape(40, 16, 4, 3), salt=b"video") != reference
    with pytest.raises(ValueError):
        frames_content_hash(frames, frame_digests=[b""])


def test_digests_taken_while_decoding_give_the_same_hash(several_gops: bytes) -> None:
    squashed = read_video(several_gops, fps=2, max_workers=3, frame_size=20)
    assert squashed.frame_digests == [frame_digest(frame) for frame in squashed.frames]
    assert frames_content_hash(
        squashed.frames, frame_digests=squashed.frame_digests
    ) == frames_content_hash(squashed.frames)
    assert read_video(several_gops, fps=2).frame_digests is None


def test_normalize_pixels_of_tensors_matches_numpy() -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    for norm in (PixelNormalization(), PixelNormalization(1 / 256, (0.4, 0.5, 0.6), (0.2,) * 3)):
        reference = normalize_pixels(images, norm)
        assert reference.shape == (3, 3, 5, 7) and reference.dtype == torch.float32
        assert torch.equal(normalize_pixels(torch.from_numpy(images), norm), reference)
        half = normalize_pixels(torch.from_numpy(images), norm, torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, reference.to(torch.bfloat16))
    with pytest.raises(ValueError):
        normalize_pixels(torch.zeros((1, 4, 4, 3)))


@needs_golden
def test_media_items_carry_uint8_pixels() -> None:
    case = next(c for c in CASES if load_case(c)[0]["modality"] == "video")
    (item,) = processor_for(case).process(golden_messages(case)).media
    size = processor_for(case).config.image_size
    assert item.pixels.dtype == np.uint8 and item.pixels.shape == (item.num_views, size, size, 3)
    assert item.pixel_values.shape == (item.num_views, 3, size, size)
    cpu = torch.device("cpu")
    assert torch.equal(item.pixel_values_on(cpu, torch.float32), item.pixel_values)
    assert torch.equal(
        item.pixel_values_on(cpu, torch.bfloat16), item.pixel_values.to(torch.bfloat16)
    )
    float_item = pickle.dumps(item.pixel_values.numpy())
    assert len(pickle.dumps(item)) < len(float_item) / 3  # what the engine is sent
    frames = video_from_frames(np.load(GOLDEN / case / "input" / "frames.npy")).frames
    assert np.array_equal(item.pixels, resize_frames(frames, size))


def test_frames_land_in_one_array_and_a_size_change_is_a_media_error() -> None:
    convert = video_module._FrameConverter(None, [3, 7])
    first = np.full((4, 6, 3), 9, dtype=np.uint8)
    convert(av.VideoFrame.from_ndarray(first, format="rgb24"), 7)
    assert np.array_equal(convert.stacked([7]), first[None])
    with pytest.raises(MediaError, match="frame size changes"):
        convert(av.VideoFrame.from_ndarray(np.zeros((8, 6, 3), np.uint8), format="rgb24"), 3)
