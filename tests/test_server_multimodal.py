"""Quicksviewer through the HTTP server: a real server process with the built-in demo model,
driven by the official openai client with video and image parts (file:// and data: URLs)."""

from __future__ import annotations

import base64
import io
import itertools
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from media_factory import CLIP_SECONDS, encode_scenes
from PIL import Image
from server_process import ServerProcess

from cubeserve.demo import ensure_demo_model
from cubeserve.engine.tokenizer import load_tokenizer
from cubeserve.multimodal.media import MediaError
from cubeserve.multimodal.processors import create_messages_processor
from cubeserve.multimodal.video import read_video
from cubeserve.server_args import ServerArgs

MODEL = "demo"
QUESTION = "What happens in the video?"
GREEDY = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
TOKENS_PER_BLOCK = 64  # the demo's num_queries: each thumbnail / cube / image view


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_part(url: str, **options: float) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **options}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*media: dict, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*media, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    (directory / "clip.mp4").write_bytes(encode_scenes())
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, media_dir: Path, demo_cache_dir: Path):
    flags = ["--served-model-name", MODEL, "--max-total-tokens", "8192",
             "--allowed-local-media-path", str(media_dir)]
    process = ServerProcess(flags, demo_cache_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def clip_url(media_dir: Path) -> str:
    return (media_dir / "clip.mp4").as_uri()


@pytest.fixture(scope="module")
def clip_timestamps(media_dir: Path) -> list[float]:
    """The frames the server samples by default (1 fps), read with the server's own reader."""
    return read_video(media_dir / "clip.mp4").timestamps


@pytest.fixture(scope="module")
def text_only_prompt_tokens(client: openai.OpenAI) -> int:
    response = client.chat.completions.create(model=MODEL, messages=ask(), **GREEDY)
    return response.usage.prompt_tokens


def cubes_of(response) -> list[list[dict]]:
    return response.model_extra["cubes"]


def assert_segments_cover(segments: list[dict], timestamps: list[float]) -> None:
    """Monotone, non-overlapping, contiguous cubes from the first frame to the last."""
    assert segments[0]["start_frame"] == 0 and segments[-1]["end_frame"] == len(timestamps)
    assert segments[0]["start_time"] == timestamps[0] and segments[-1]["end_time"] == timestamps[-1]
    for segment, following in itertools.pairwise(segments):
        assert segment["end_frame"] == following["start_frame"]
        assert segment["end_time"] < following["start_time"]
    for segment in segments:
        assert segment["start_frame"] < segment["end_frame"]
        assert segment["start_time"] == timestamps[segment["start_frame"]]
        assert segment["end_time"] == timestamps[segment["end_frame"] - 1]


def test_video_file_url_streams_with_cubes(client, clip_url, clip_timestamps, text_only_prompt_tokens):
    stream = client.chat.completions.create(
        model=MODEL, messages=ask(video_part(clip_url)), stream=True, stream_options={"include_usage": True},
        max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "return_cubes": True},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) >= 2
    with_cubes = [i for i, c in enumerate(chunks) if c.model_extra.get("cubes") is not None]
    assert len(with_cubes) == 1 and with_cubes[0] <= chunks.index(text_chunks[0])
    [segments] = chunks[with_cubes[0]].model_extra["cubes"]
    assert_segments_cover(segments, clip_timestamps)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 8
    # Every cube and the thumbnail become TOKENS_PER_BLOCK prompt tokens, plus the video's own text.
    assert usage.prompt_tokens > text_only_prompt_tokens + TOKENS_PER_BLOCK * (1 + len(segments))


def test_video_data_url_equals_file_url_and_reuses_its_kv(client, media_dir, clip_url):
    kwargs = dict(model=MODEL, **{**GREEDY, "extra_body": {"ignore_eos": True, "return_cubes": True}})
    from_file = client.chat.completions.create(messages=ask(video_part(clip_url)), **kwargs)
    inline = data_url((media_dir / "clip.mp4").read_bytes(), "video/mp4")
    from_data = client.chat.completions.create(messages=ask(video_part(inline)), **kwargs)
    assert from_data.choices[0].message.content == from_file.choices[0].message.content
    assert cubes_of(from_data) == cubes_of(from_file)
    assert from_data.usage.prompt_tokens == from_file.usage.prompt_tokens
    # Same frames, same pad ids: the whole video prefix comes from the radix cache.
    [segments] = cubes_of(from_data)
    cached = from_data.usage.prompt_tokens_details.cached_tokens
    assert cached >= TOKENS_PER_BLOCK * (1 + len(segments))


def test_fps_and_max_frames_change_the_frame_count(client, clip_url, clip_timestamps):
    kwargs = dict(model=MODEL, **{**GREEDY, "extra_body": {"return_cubes": True}})
    default = client.chat.completions.create(messages=ask(video_part(clip_url)), **kwargs)
    denser = client.chat.completions.create(messages=ask(video_part(clip_url, fps=2, max_frames=8)), **kwargs)
    assert cubes_of(default)[0][-1]["end_frame"] == len(clip_timestamps) == CLIP_SECONDS
    assert cubes_of(denser)[0][-1]["end_frame"] == 8


def test_png_image_data_url(client, text_only_prompt_tokens):
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, 20:] = (250, 200, 10)
    image = data_url(png(Image.fromarray(pixels)), "image/png")
    response = client.chat.completions.create(
        model=MODEL, messages=ask(image_part(image), question="What is in the picture?"),
        **{**GREEDY, "extra_body": {"ignore_eos": True, "return_cubes": True}},
    )
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 8
    assert cubes_of(response) == []  # no video, nothing segmented
    # anyres: the whole image plus at least one tile, each a block of tokens.
    assert response.usage.prompt_tokens > text_only_prompt_tokens + 2 * TOKENS_PER_BLOCK


def zero_frame_mp4() -> bytes:
    return encode_scenes(num_frames=0)


def truncated_mp4() -> bytes:
    clip = encode_scenes()
    return clip[: len(clip) // 2]


def huge_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: decoders must refuse it unread."""
    small = png(Image.new("RGB", (1, 1)))
    header = b"IHDR" + struct.pack(">II", width, height) + small[24:29]  # signature, length, IHDR
    return small[:12] + header + struct.pack(">I", zlib.crc32(header)) + small[33:]


@pytest.mark.parametrize("part, message", [
    (lambda: video_part(data_url(truncated_mp4(), "video/mp4")), "cannot open video"),
    (lambda: video_part(data_url(b"this is not a video" * 100, "video/mp4")), "cannot open video"),
    (lambda: video_part(data_url(zero_frame_mp4(), "video/mp4")), "no video stream"),
    (lambda: image_part(data_url(huge_png(20_000, 20_000), "image/png")), "larger than the limit"),
    (lambda: image_part(data_url(huge_png(9_000, 9_000), "image/png")), "9000x9000 pixels is larger than"),
    (lambda: image_part(data_url(encode_scenes(), "image/png")), "cannot decode image"),
    (lambda: video_part("file:///etc/hostname"), "outside the allowed media directory"),
    (lambda: video_part("../clip.mp4"), "outside the allowed media directory"),
    (lambda: video_part("file:///no/such/dir/clip.mp4"), "outside the allowed media directory"),
    (lambda: video_part("missing.mp4"), "does not exist"),
    (lambda: video_part("https://example.com/clip.mp4"), "cannot reach the network"),
], ids=["truncated-mp4", "not-a-video", "zero-frames", "decompression-bomb", "over-pixel-limit", "video-as-image",
        "outside-dir", "dotdot", "outside-dir-missing", "missing-file", "remote-url"])
def test_bad_media_is_400_and_the_server_keeps_serving(server, client, part, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": ask(part()), "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]
    assert error["param"] == f"messages.0.content.0.{part()['type']}"
    after = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_bad_media_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="cannot open video"):
        client.chat.completions.create(
            model=MODEL, messages=ask(video_part(data_url(truncated_mp4(), "video/mp4"))), stream=True)


@pytest.mark.parametrize("part, param", [
    ({"type": "video_url", "video_url": {"url": "clip.mp4", "fps": 0}}, "messages.0.content.0.video_url.fps"),
    ({"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 0}},
     "messages.0.content.0.video_url.max_frames"),
    ({"type": "video_url", "video_url": {"url": ""}}, "messages.0.content.0.video_url.url"),
    ({"type": "video_url", "video_url": {"url": "clip.mp4", "frames": 3}}, "messages.0.content.0.video_url.frames"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages.0.content.0"),
])
def test_malformed_media_parts_name_the_field(server, part, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": ask(part)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_local_media_is_disabled_without_an_allowed_directory(server, demo_cache_dir, media_dir, monkeypatch):
    """The processor a server without --allowed-local-media-path uses: inline media only."""
    monkeypatch.setenv("CUBESERVE_CACHE", str(demo_cache_dir))
    model_path = ensure_demo_model()  # already built by the server
    process = create_messages_processor(ServerArgs(model_path=model_path), load_tokenizer(model_path))
    clip = media_dir / "clip.mp4"
    for local in (clip.as_uri(), str(clip)):
        with pytest.raises(MediaError, match="local media paths are disabled"):
            process(ask(video_part(local)))
    _, processed = process(ask(video_part(data_url(clip.read_bytes(), "video/mp4"))))
    assert [item.kind for item in processed.media] == ["video"]


@pytest.mark.parametrize("flags", [[], ["--inline", "--fps", "2", "--max-frames", "8"]], ids=["file-url", "inline"])
def test_video_qa_example(server, media_dir, flags):
    example = Path(__file__).resolve().parents[1] / "examples" / "video_qa.py"
    result = subprocess.run(
        [sys.executable, str(example), str(media_dir / "clip.mp4"), QUESTION, "--base-url", f"{server.url}/v1",
         "--max-tokens", "4", *flags], capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    cubes = [line for line in result.stdout.splitlines() if line.startswith("cube ")]
    assert cubes[0].startswith("cube 0: frames 0-")
    assert cubes[-1].split(", ")[0].endswith(f"-{7 if flags else CLIP_SECONDS - 1}")
