"""Request preprocessing against the Quicksviewer goldens, plus media loading and video decoding."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cubeserve.multimodal.image import (
    anyres_views,
    normalize_pixels,
    num_anyres_views,
    parse_grid_pinpoints,
    select_best_resolution,
    split_into_tiles,
)
from cubeserve.multimodal.media import (
    MediaError,
    MediaLimits,
    content_hash,
    decode_image,
    load_image,
    resolve_media_source,
)
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    QuicksviewerProcessor,
    QuicksviewerProcessorConfig,
    cube_bounds_as_returned,
    kept_timestamps,
    merge_video_placeholders,
    postprocess_output_ids,
    tokenize_with_placeholders,
)
from cubeserve.multimodal.video import (
    probe_video,
    read_video,
    sample_frame_indices,
    video_from_frames,
)

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared/golden is not available")
CASES = (
    sorted(p.name for p in GOLDEN.iterdir() if (p / "model").is_dir()) if GOLDEN.is_dir() else []
)
P = IMAGE_PLACEHOLDER_ID


# --------------------------------------------------------------------------- helpers


@cache
def processor_for(case: str) -> QuicksviewerProcessor:
    return QuicksviewerProcessor.from_pretrained(GOLDEN / case / "model")


def load_case(case: str) -> tuple[dict, dict]:
    root = GOLDEN / case
    return (
        json.loads((root / "input" / "request.json").read_text()),
        json.loads((root / "expected" / "expected.json").read_text()),
    )


def golden_messages(case: str) -> list[dict]:
    """The case's turns as OpenAI-style messages; the visual input belongs to the first turn."""
    request, _ = load_case(case)
    root = GOLDEN / case / "input"
    media: list[dict] = []
    if request["modality"] == "video":
        frames = np.load(root / request["frames_file"])
        media = [{"type": "video", "video": frames, "timestamps": request["timestamps"]}]
    elif request["modality"] == "image":
        media = [
            {"type": "image_url", "image_url": {"url": data_url(root / name, "image/png")}}
            for name in request["image_files"]
        ]
    messages = []
    for k, turn in enumerate(request["turns"]):
        parts = (media if k == 0 else []) + [{"type": "text", "text": turn["user"]}]
        messages.append({"role": "user", "content": parts})
        if turn["assistant"] is not None:
            messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def index_pattern(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """The sampling clip's frame code: 16x16 block b (row-major) is white iff bit b is set."""
    frame = np.zeros((height, width, 3), np.uint8)
    for bit in range(12):
        if index >> bit & 1:
            row, col = divmod(bit, 4)
            frame[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = 255
    return frame


def decode_index(frame: np.ndarray) -> int:
    index = 0
    for bit in range(12):
        row, col = divmod(bit, 4)
        if frame[row * 16 + 4 : row * 16 + 12, col * 16 + 4 : col * 16 + 12].mean() > 127:
            index |= 1 << bit
    return index


def encode_video(
    num_frames: int,
    *,
    codec: str = "mpeg4",
    fmt: str = "mp4",
    rate: int = 25,
    gop: int = 12,
    options: dict | None = None,
    rotation: int | None = None,
    path: Path | None = None,
    container_options: dict | None = None,
) -> bytes:
    target = str(path) if path else io.BytesIO()
    container = av.open(target, "w", format=fmt, options=container_options or {})
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.codec_context.gop_size = gop
    if options:
        stream.options = options
    if rotation is not None:
        stream.set_display_rotation(rotation)
    container.start_encoding()
    for i in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(index_pattern(i), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path.read_bytes() if path else target.getvalue()


def h264_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


# --------------------------------------------------------------------------- golden cases


@needs_golden
@pytest.mark.parametrize("case", CASES)
def test_prompt_and_input_ids(case: str) -> None:
    _, expected = load_case(case)
    result = processor_for(case).process(golden_messages(case))
    assert result.prompt == expected["prompt"]
    assert result.prompt == (GOLDEN / case / "input" / "prompt.txt").read_text()
    assert result.input_ids == expected["input_ids"]
    assert result.input_ids.count(P) == expected["num_image_placeholders_in_input_ids"]
    assert sum(item.num_placeholders for item in result.media) == result.input_ids.count(P)


@needs_golden
@pytest.mark.parametrize("case", CASES)
def test_pixel_values_and_views(case: str) -> None:
    _, expected = load_case(case)
    result = processor_for(case).process(golden_messages(case))
    if expected.get("pixel_values_shape") is None:
        assert result.media == [] and result.pixel_values is None
        return
    reference = np.load(GOLDEN / case / "expected" / "tensors.npz")["pixel_values"]
    pixels = result.pixel_values
    assert pixels.dtype == torch.float32
    assert list(pixels.shape) == expected["pixel_values_shape"]
    np.testing.assert_allclose(pixels.numpy(), reference, rtol=0, atol=1e-6)
    assert result.imidx_in_multi == expected["imidx_in_multi"][0]
    sizes = [list(size) for item in result.media for size in item.image_sizes]
    assert sizes == expected["image_sizes_wh"][0]
    if expected["modality"] == "image":
        views = [item.num_views for item in result.media]
        assert result.view_offsets == expected["imidx_in_multi"][0]
        assert sum(views) == expected["pixel_values_shape"][0]
        config = processor_for(case).config
        for item in result.media:
            assert item.num_views == num_anyres_views(
                item.image_sizes[0], config.image_size, config.grid_pinpoints
            )


@needs_golden
@pytest.mark.parametrize("case", CASES)
def test_cube_merge_layout(case: str) -> None:
    _, expected = load_case(case)
    result = processor_for(case).process(golden_messages(case))
    video = expected.get("video")
    if not video:
        assert result.video_spans == []
        assert result.input_ids == expected["layout_after_cube_merge"]["input_ids"]
        return
    bounds = video["cubing"]["frame_bounds"]
    (item,) = result.media
    assert item.timestamps == video["timestamps"]
    assert [list(span) for span in result.video_spans] == video["videos_bound_after_cubing"]
    assert result.merge_cubes([bounds]) == expected["layout_after_cube_merge"]["input_ids"]
    assert kept_timestamps(item.timestamps, bounds) == video["kept_timestamps"]
    assert cube_bounds_as_returned(bounds, item.has_thumbnail) == video["cube_bound_as_returned"][0]


@needs_golden
@pytest.mark.parametrize("case", CASES)
def test_output_postprocessing(case: str) -> None:
    _, expected = load_case(case)
    generated = expected["generated"]
    tokenizer = processor_for(case).tokenizer
    assert postprocess_output_ids(generated["raw_output_ids"], tokenizer) == generated["text"]


@needs_golden
def test_content_hash_identifies_media() -> None:
    case = next(c for c in CASES if load_case(c)[0]["modality"] == "video")
    first = processor_for(case).process(golden_messages(case)).media[0]
    again = processor_for(case).process(golden_messages(case)).media[0]
    assert first.content_hash == again.content_hash
    frames = np.load(GOLDEN / case / "input" / "frames.npy").copy()
    frames[0, 0, 0] ^= 255
    request, _ = load_case(case)
    changed = (
        processor_for(case)
        .process(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": frames, "timestamps": request["timestamps"]}
                    ],
                }
            ]
        )
        .media[0]
    )
    assert changed.content_hash != first.content_hash
    assert 0 <= first.content_hash < 2**63


# --------------------------------------------------------------------------- processor behaviour


@needs_golden
def test_literal_pad_token_does_not_break_the_cube_merge() -> None:
    case = next(c for c in CASES if load_case(c)[0]["modality"] == "video")
    processor = processor_for(case)
    request, expected = load_case(case)
    frames = np.load(GOLDEN / case / "input" / request["frames_file"])
    question = "Is <|endoftext|> a pad token? And what about <image> here?"
    result = processor.process(
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": frames, "timestamps": request["timestamps"]},
                    {"type": "text", "text": question},
                ],
            }
        ]
    )
    assert "<|endoftext|>" in result.prompt
    # The typed "<image>" is text, not a placeholder.
    assert result.input_ids.count(P) == len(frames) + 1
    merged = result.merge_cubes([expected["video"]["cubing"]["frame_bounds"]])
    tail = processor.tokenizer(question + "<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert merged[-len(tail) :] == tail
    assert merged.count(P) == len(expected["video"]["cubing"]["frame_bounds"]) + 1


@needs_golden
def test_system_message_multi_image_and_history() -> None:
    processor = (
        processor_for("c_qwen2_image_anyres")
        if "c_qwen2_image_anyres" in CASES
        else processor_for(CASES[0])
    )
    small = np.full((40, 100, 3), 200, np.uint8)
    tall = Image.fromarray(np.full((100, 30, 3), 50, np.uint8))
    result = processor.process(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare."},
                    {"type": "image", "image": small},
                    {"type": "image", "image": tall},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
            {"role": "user", "content": "Why?"},
        ]
    )
    assert result.prompt.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<im_start>"
    )
    assert result.prompt.endswith(
        "<im_end>\nCompare.<|im_end|>\n<|im_start|>assistant\nThey differ.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [item.kind for item in result.media] == ["image", "image"]
    assert [item.image_sizes for item in result.media] == [[(100, 40)], [(30, 100)]]
    spans = [item.placeholder_span for item in result.media]
    assert (
        spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == result.input_ids.count(P)
    )
    assert result.pixel_values.shape[0] == sum(item.num_views for item in result.media)
    with pytest.raises(ValueError):
        processor.process(
            [
                {"role": "assistant", "content": [{"type": "image", "image": small}]},
                {"role": "user", "content": "hi"},
            ]
        )


@needs_golden
def test_llama3_chunks_keep_one_bos() -> None:
    case = next((c for c in CASES if load_case(c)[0]["backbone"] == "llama3"), None)
    if case is None:
        pytest.skip("no llama3 golden case")
    tokenizer = processor_for(case).tokenizer
    ids = tokenize_with_placeholders(["a", "", "b"], tokenizer)
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1 and ids.count(P) == 2
    assert (
        ids[1:]
        == tokenizer("a", add_special_tokens=False)["input_ids"]
        + [P, P]
        + tokenizer("b", add_special_tokens=False)["input_ids"]
    )


def _flag_config(**flags) -> QuicksviewerProcessorConfig:
    return QuicksviewerProcessorConfig(image_size=42, grid_pinpoints=((48, 48),), **flags)


@needs_golden
@pytest.mark.parametrize("thumbnail", [False, True])
def test_video_block_without_markers(thumbnail: bool) -> None:
    tokenizer = processor_for(CASES[0]).tokenizer
    processor = QuicksviewerProcessor(tokenizer, _flag_config(mm_use_thumbnail=thumbnail))
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    result = processor.process(
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": frames, "fps": 2},
                    {"type": "text", "text": " Q? "},
                ],
            }
        ]
    )
    thumb = "<image>" if thumbnail else ""
    assert result.prompt == (
        f"<|im_start|>user\n{thumb}0.0<image>0.5<image>1.0<image>1.5<image>\n Q?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    merged = result.merge_cubes([[[0, 2], [2, 4]]])
    assert merged.count(P) == 2 + thumbnail
    text = tokenizer.decode([t for t in merged if t != P])
    assert "0.0" in text and "1.0" in text and "0.5" not in text and "1.5" not in text


@needs_golden
def test_video_url_parts_are_sampled_and_decoded(tmp_path: Path) -> None:
    data = encode_video(250, gop=25)
    (tmp_path / "clip.mp4").write_bytes(data)
    model_dir = GOLDEN / CASES[0] / "model"
    processor = QuicksviewerProcessor.from_pretrained(model_dir, allowed_local_media_path=tmp_path)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    for source in [url, "clip.mp4", f"file://{tmp_path / 'clip.mp4'}"]:
        result = processor.process(
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "video_url",
                            "video_url": {"url": source, "fps": 2, "max_frames": 5},
                        },
                        {"type": "text", "text": "What?"},
                    ],
                }
            ]
        )
        (item,) = result.media
        assert item.kind == "video" and item.num_views == 5
        assert (
            item.frame_indices == sample_frame_indices(250, 25.0, 2, 5) == [31, 81, 131, 181, 231]
        )
        assert item.timestamps == [1.2, 3.2, 5.2, 7.2, 9.2]
        assert (
            "<thumbnail_end>1.2<image>3.2<image>5.2<image>7.2<image>9.2<image><video_end>\nWhat?"
            in result.prompt
        )
        assert item.pixel_values.shape == (
            5,
            3,
            processor.config.image_size,
            processor.config.image_size,
        )
    with pytest.raises(MediaError, match="disabled"):
        QuicksviewerProcessor.from_pretrained(model_dir).process(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": str(tmp_path / "clip.mp4")}}
                    ],
                }
            ]
        )


# --------------------------------------------------------------------------- cube merge (pure)


def test_merge_video_placeholders_structural() -> None:
    # text, image placeholder, video (thumbnail + 4 frames with 2-token timestamps), text.
    ids = [1, P, 2, 9, P, 10, 11, P, 12, 13, P, 14, 15, P, 16, 17, P, 3, 4]
    merged = merge_video_placeholders(ids, [(1, 6)], [[[0, 1], [1, 3], [3, 4]]], has_thumbnail=True)
    assert merged == [1, P, 2, 9, P, 10, 11, P, 12, 13, P, 16, 17, P, 3, 4]
    no_thumb = merge_video_placeholders(ids, [(2, 6)], [[[0, 2], [2, 4]]], has_thumbnail=False)
    assert no_thumb == [1, P, 2, 9, P, 10, 11, P, 14, 15, P, 3, 4]
    assert merge_video_placeholders(ids, [], []) == ids
    with pytest.raises(ValueError):
        merge_video_placeholders(ids, [(1, 6)], [[[0, 2], [3, 4]]])
    with pytest.raises(ValueError):
        merge_video_placeholders(ids, [(1, 6)], [[[0, 5]]])


# --------------------------------------------------------------------------- frame sampling


@needs_golden
def test_sampling_golden_indices_timestamps_and_pixels() -> None:
    root = GOLDEN / "sampling"
    expected = json.loads((root / "expected.json").read_text())
    request = json.loads((root / "input" / "request.json").read_text())
    clip = root / request["video_file"]
    probe = probe_video(clip)
    reported = expected["clip"]["opencv_reported"]
    assert (
        probe.fps == reported["CAP_PROP_FPS"]
        and probe.frame_count == reported["CAP_PROP_FRAME_COUNT"]
    )
    data = clip.read_bytes()
    for entry in expected["results"]:
        for mode in ("auto", "sequential"):
            video = read_video(
                data, fps=entry["fps"], num_frames=entry["num_frames"], decode_mode=mode
            )
            decoded = [decode_index(frame) for frame in video.frames]
            assert decoded == video.frame_indices
            assert video.frames.dtype == np.uint8 and video.frames.shape[1:] == (48, 64, 3)
            if "error" in entry:  # the original crashed; one frame every 1/fps seconds instead
                every = read_video(data, fps=entry["fps"], decode_mode=mode)
                assert np.allclose(np.diff(every.timestamps), 1 / entry["fps"])
                assert every.timestamps[0] == 0.5 / entry["fps"]
                assert set(video.frame_indices) <= set(every.frame_indices)
                assert len(video.frame_indices) == min(
                    entry["num_frames"], len(every.frame_indices)
                )
                continue
            assert video.frame_indices == entry["frame_indices"], (entry, mode)
            assert video.timestamps == entry["timestamps"], (entry, mode)


def test_sample_frame_indices_rules() -> None:
    assert sample_frame_indices(300, 25.0, 1) == [12 + 25 * k for k in range(12)]
    assert sample_frame_indices(300, 25.0, 0.5) == [25 + 50 * k for k in range(6)]
    assert sample_frame_indices(300, 25.0, 0.1) == [125]
    assert sample_frame_indices(10, 25.0, 0.1) == [4]
    assert sample_frame_indices(300, 25.0, 100) == list(range(300))
    assert len(sample_frame_indices(300, 25.0, 1, num_frames=1000)) == 12
    with pytest.raises(MediaError):
        sample_frame_indices(300, 25.0, 0)


def test_seeking_matches_sequential_decoding() -> None:
    codec = h264_codec()
    options = {"bf": "3"} if codec == "libx264" else {}
    data = encode_video(250, codec=codec, gop=50, options=options)
    for fps, num_frames in [(1, None), (0.3, None), (1, 4), (2, None), (25, 16)]:
        auto = read_video(data, fps=fps, num_frames=num_frames)
        sequential = read_video(data, fps=fps, num_frames=num_frames, decode_mode="sequential")
        assert auto.frame_indices == sequential.frame_indices
        assert np.array_equal(auto.frames, sequential.frames)
        assert [decode_index(f) for f in auto.frames] == auto.frame_indices


def test_rotated_video_is_returned_upright() -> None:
    data = encode_video(30, rotation=90)
    assert read_video(data, fps=1).frames.shape[1:] == (64, 48, 3)


def test_video_from_frames_defaults() -> None:
    frames = np.zeros((5, 6, 7, 3), np.uint8)
    assert video_from_frames(frames).timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert video_from_frames(frames, fps=2).timestamps == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert video_from_frames(list(frames), [1, 2, 3, 4, 5]).timestamps == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(MediaError):
        video_from_frames(frames, [0.0, 1.0])
    with pytest.raises(MediaError):
        video_from_frames(np.zeros((0, 6, 7, 3), np.uint8))
    with pytest.raises(MediaError):
        video_from_frames(frames.astype(np.float32))


# --------------------------------------------------------------------------- media errors


def test_truncated_and_corrupt_videos_raise(tmp_path: Path) -> None:
    whole = encode_video(100)
    with pytest.raises(MediaError):
        read_video(whole[: len(whole) // 2])
    faststart = encode_video(
        100, path=tmp_path / "fast.mp4", container_options={"movflags": "faststart"}
    )
    with pytest.raises(MediaError, match="truncated"):
        read_video(faststart[: len(faststart) // 2], fps=1)
    with pytest.raises(MediaError):
        read_video(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError):
        read_video(encode_video(0, path=tmp_path / "empty.mp4"))
    with pytest.raises(MediaError):
        read_video(b"")


def test_local_paths_are_confined(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    clip = allowed / "clip.mp4"
    clip.write_bytes(encode_video(30))
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (allowed / "escape.png").symlink_to(secret)

    with pytest.raises(MediaError, match="disabled"):
        resolve_media_source(str(clip))
    assert resolve_media_source(str(clip), allowed_local_media_path=allowed) == clip.resolve()
    assert (
        resolve_media_source(f"file://{clip}", allowed_local_media_path=allowed) == clip.resolve()
    )
    assert resolve_media_source("clip.mp4", allowed_local_media_path=allowed) == clip.resolve()
    for outside in [str(secret), f"file://{secret}", "../secret.png", str(allowed / "escape.png")]:
        with pytest.raises(MediaError, match="outside"):
            resolve_media_source(outside, allowed_local_media_path=allowed)
    with pytest.raises(MediaError, match="does not exist"):
        resolve_media_source("missing.mp4", allowed_local_media_path=allowed)
    for url in ["http://example.com/a.png", "https://example.com/v.mp4"]:
        with pytest.raises(MediaError, match="network"):
            resolve_media_source(url, allowed_local_media_path=allowed)
    with pytest.raises(MediaError, match="scheme"):
        resolve_media_source("ftpx://host/a.png", allowed_local_media_path=allowed)

    video = read_video(resolve_media_source("clip.mp4", allowed_local_media_path=allowed), fps=1)
    assert video.frame_indices == [12]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_image_errors_and_data_urls() -> None:
    with pytest.raises(MediaError, match="larger than the limit"):
        decode_image(_png_header_only(100_000, 100_000))
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), (10, 20, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with pytest.raises(MediaError, match="larger than the limit"):
        decode_image(png, limits=MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaError):
        decode_image(np.random.default_rng(1).bytes(1000))
    with pytest.raises(MediaError):
        decode_image(png[: len(png) // 2])
    with pytest.raises(MediaError, match="base64"):
        load_image("data:image/png;base64,@@@")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    image = load_image(url)
    assert image.size == (100, 100) and image.getpixel((5, 5)) == (10, 20, 30)


def test_content_hash_is_stable() -> None:
    assert content_hash(b"abc") == 5505630094788892713
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_hash(array) == content_hash(torch.from_numpy(array.copy()))
    assert content_hash(array) != content_hash(array.astype(np.int16))
    assert content_hash(array) != content_hash(array.reshape(4, 3))


# --------------------------------------------------------------------------- pixels


def test_anyres_geometry() -> None:
    pinpoints = parse_grid_pinpoints("[(24, 48), (48, 48), (96, 24)]")
    assert (
        pinpoints
        == parse_grid_pinpoints("[[24, 48], [48, 48], [96, 24]]")
        == parse_grid_pinpoints([[24, 48], [48, 48], [96, 24]])
    )
    assert select_best_resolution((100, 40), pinpoints) == (96, 24)
    canvas = np.full((48, 50, 3), 255, np.uint8)
    tiles = split_into_tiles(canvas, 42)
    assert tiles.shape == (4, 42, 42, 3)
    assert tiles[0].min() == 255 and tiles[1][:, :8].min() == 255 and tiles[1][:, 8:].max() == 0
    assert tiles[3][:6, :8].min() == 255 and tiles[3][6:].max() == 0
    views = anyres_views(Image.new("RGB", (100, 40), (255, 255, 255)), 42, pinpoints)
    assert views.shape == (1 + 3, 42, 42, 3)
    normalized = normalize_pixels(views)
    assert normalized.shape == (4, 3, 42, 42) and normalized.dtype == torch.float32
    assert normalized.max() == 1.0 and normalized.min() == -1.0
