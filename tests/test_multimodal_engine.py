"""Quicksviewer requests through the real Engine, the media caches and the encode stage.

Every request runs on the golden checkpoint ``a_qwen2_video_24f`` (tiny random weights, CPU,
float32), with the golden cases' videos and pictures. References come from an engine with the
radix cache off, each request run alone and unchunked; the engines under test must reproduce
them exactly (greedy ids) and closely (the first step's top log-probabilities, i.e. the last
prompt position's logits).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from cubeserve.engine.engine import Engine
from cubeserve.engine.io_struct import TokenizedGenerateReq
from cubeserve.engine.model_runner import ModelRunner, load_model_config
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.multimodal.cache import ByteBoundedLRU
from cubeserve.multimodal.encode_stage import (
    MultimodalEncodeStage,
    create_encode_stage,
    pad_token_id,
)
from cubeserve.multimodal.media import MediaError
from cubeserve.multimodal.processors import quicksviewer
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    QuicksviewerProcessor,
)
from cubeserve.multimodal.transport import PixelFile, media_key
from cubeserve.scheduler.request import Req
from cubeserve.scheduler.scheduler import build_scheduler
from cubeserve.server_args import ServerArgs

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
if not GOLDEN.is_dir():
    pytest.skip(f"golden cases not found at {GOLDEN}", allow_module_level=True)

MODEL = GOLDEN / "a_qwen2_video_24f" / "model"
CLIP = GOLDEN / "sampling" / "clip.mp4"  # 12 s at 25 fps, 64x48
GREEDY = {"max_new_tokens": 16, "temperature": 0.0}
TOP_K = 5
ENGINE_ARGS: dict[str, Any] = {"dtype": "float32", "max_total_tokens": 8192}
LOGPROB_ATOL = 1e-4


# --------------------------------------------------------------------------- requests


def golden_input(case: str) -> tuple[dict, Path]:
    root = GOLDEN / case / "input"
    return json.loads((root / "request.json").read_text()), root


def golden_frames(case: str) -> tuple[np.ndarray, list[float]]:
    request, root = golden_input(case)
    return np.load(root / request["frames_file"]), request["timestamps"]


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video(frames: np.ndarray, timestamps: list[float]) -> dict:
    return {"type": "video", "video": {"frames": frames, "timestamps": timestamps}}


def video_url(url: str, **options: Any) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **options}}


def golden_image(case: str, index: int) -> dict:
    _, root = golden_input(case)
    url = data_url((root / f"image_{index}.png").read_bytes(), "image/png")
    return {"type": "image_url", "image_url": {"url": url}}


def user(*media: dict, text: str) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


FRAMES, TIMES = golden_frames("a_qwen2_video_24f")
G_FRAMES, G_TIMES = golden_frames("g_qwen2_video_two_turn")
MIRRORED = np.ascontiguousarray(FRAMES[:, :, ::-1])  # seen by the KV-sharing test only

CONVERSATIONS: dict[str, list[dict]] = {
    "video": [user(video(FRAMES, TIMES), text="What is moving in the video?")],
    "image": [user(golden_image("c_qwen2_image_anyres", 0), text="What shapes are in it?")],
    "two_images": [
        user(
            golden_image("d_qwen2_two_images", 0),
            golden_image("d_qwen2_two_images", 1),
            text="What is different between the two images?",
        )
    ],
    "text": [user(text="Tell me a story about a red square.")],
    "two_turns": [
        user(video(G_FRAMES, G_TIMES), text="What color is the object that moves first?"),
        assistant("The red square moves first."),
        user(text="How many scene changes are there?"),
    ],
    "media_in_last_turn": [
        user(text="I will show you a clip."),
        assistant("Please do."),
        user(video(G_FRAMES, G_TIMES), golden_image("c_qwen2_image_anyres", 0), text="Match?"),
    ],
    "mirrored": [user(video(MIRRORED, TIMES), text="What moves?")],
    "mirrored_second_turn": [
        user(video(MIRRORED, TIMES), text="What moves?"),
        assistant("A square."),
        user(text="And then?"),
    ],
}
BATCH = ["video", "image", "text", "two_images", "two_turns", "media_in_last_turn"]
CHUNKED_BATCH = ["video", "image", "text"]
SHORT_CONTEXT = 640
# Two videos of 6 blocks of 64 tokens each: past SHORT_CONTEXT only once they are encoded.
TOO_LONG_ONCE_ENCODED = [user(video(FRAMES, TIMES), video(FRAMES, TIMES), text="Same?")]


@functools.cache
def processor(allowed_local_media_path: str | None = None) -> QuicksviewerProcessor:
    return QuicksviewerProcessor.from_pretrained(
        MODEL, allowed_local_media_path=allowed_local_media_path
    )


def media_span(
    conversation: list[dict], prompt_tokens: int, allowed_local_media_path: str | None = None
) -> tuple[int, int]:
    """Prompt positions [first media token, end of the last media token) after expansion: the
    ids before the first placeholder and after the last one are not changed by it."""
    ids = processor(allowed_local_media_path).process(conversation).input_ids
    last = len(ids) - 1 - ids[::-1].index(IMAGE_PLACEHOLDER_ID)
    return ids.index(IMAGE_PLACEHOLDER_ID), prompt_tokens - (len(ids) - 1 - last)


# --------------------------------------------------------------------------- engines


def generate(engine: Engine, names: list[str]) -> list[dict]:
    return engine.generate(
        messages=[CONVERSATIONS[name] for name in names],
        sampling_params=GREEDY,
        top_logprobs_num=TOP_K,
    )


def first_step_top(result: dict) -> list[tuple[int, float]]:
    return [(token, lp) for lp, token, _ in result["meta_info"]["output_top_logprobs"][0]]


def assert_same_output(result: dict, expected: dict) -> None:
    assert result["output_ids"] == expected["output_ids"]
    assert result["meta_info"]["prompt_tokens"] == expected["meta_info"]["prompt_tokens"]
    top, expected_top = first_step_top(result), first_step_top(expected)
    assert [t for t, _ in top] == [t for t, _ in expected_top]
    np.testing.assert_allclose(
        [lp for _, lp in top], [lp for _, lp in expected_top], atol=LOGPROB_ATOL, rtol=0
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """Every conversation alone, unchunked, without prefix caching."""
    with Engine(str(MODEL), disable_radix_cache=True, **ENGINE_ARGS) as engine:
        return {name: generate(engine, [name])[0] for name in CONVERSATIONS}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media")
    shutil.copy(CLIP, path / "clip.mp4")
    return path


@pytest.fixture(scope="module")
def engine(media_dir: Path) -> Iterator[Engine]:
    with Engine(str(MODEL), allowed_local_media_path=str(media_dir), **ENGINE_ARGS) as engine:
        yield engine


@pytest.fixture(scope="module", params=[16, 37], ids=lambda chunk: f"chunk{chunk}")
def chunked_results(request: pytest.FixtureRequest) -> dict[str, dict]:
    """CHUNKED_BATCH and TOO_LONG_ONCE_ENCODED ("too_long") submitted together to an engine
    prefilling ``chunk`` tokens per forward (chunks end inside and across media blocks), with
    a context of SHORT_CONTEXT tokens."""
    with Engine(
        str(MODEL),
        chunked_prefill_size=request.param,
        context_length=SHORT_CONTEXT,
        **ENGINE_ARGS,
    ) as engine:
        results = engine.generate(
            messages=[*(CONVERSATIONS[name] for name in CHUNKED_BATCH), TOO_LONG_ONCE_ENCODED],
            sampling_params=GREEDY,
            top_logprobs_num=TOP_K,
        )
    return dict(zip([*CHUNKED_BATCH, "too_long"], results, strict=True))


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list]:
    """Wraps a function of the processor module; returns the list its calls are appended to."""

    def wrap(name: str) -> list:
        calls: list = []
        original = getattr(quicksviewer, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(quicksviewer, name, counted)
        return calls

    return wrap


# --------------------------------------------------------------------------- engine behaviour


def test_reference_reproduces_the_golden_ids_and_last_prompt_logits(reference) -> None:
    expected = json.loads((GOLDEN / "a_qwen2_video_24f/expected/expected.json").read_text())
    result = reference["video"]
    assert result["output_ids"] == expected["generated"]["raw_output_ids"]
    assert result["meta_info"]["prompt_tokens"] == expected["inputs_embeds"]["shape"][0]
    golden = expected["last_prompt_logits"]
    top = first_step_top(result)
    assert [t for t, _ in top] == golden["top5_ids"]
    # log-softmax differences are logit differences
    np.testing.assert_allclose(
        [lp - top[0][1] for _, lp in top],
        [v - golden["top5_values"][0] for v in golden["top5_values"]],
        atol=LOGPROB_ATOL,
    )
    bounds = expected["video"]["cubing"]["frame_bounds"]
    cubes = result["meta_info"]["mm_meta"]["cubes"][0]
    assert [[c["start_frame"], c["end_frame"]] for c in cubes] == bounds


def test_same_video_again_and_in_a_second_turn_reuses_kv_and_encoding(engine, reference) -> None:
    before = engine.get_stats()
    first, again, second_turn = (
        generate(engine, [name])[0] for name in ("mirrored", "mirrored", "mirrored_second_turn")
    )
    after = engine.get_stats()

    start, end = media_span(CONVERSATIONS["mirrored"], first["meta_info"]["prompt_tokens"])
    assert first["meta_info"]["cached_tokens"] <= start
    assert again["meta_info"]["cached_tokens"] >= end
    assert second_turn["meta_info"]["cached_tokens"] >= end
    assert after.encoder_cache_queries - before.encoder_cache_queries == 3
    assert after.encoder_cache_hits - before.encoder_cache_hits == 2  # encoded once
    assert_same_output(first, reference["mirrored"])
    assert_same_output(again, reference["mirrored"])
    assert_same_output(second_turn, reference["mirrored_second_turn"])


def test_different_videos_of_equal_length_share_no_cache_entry(engine) -> None:
    inverted = [user(video(255 - FRAMES, TIMES), text="Which video is this?")]
    reversed_ = [
        user(video(np.ascontiguousarray(FRAMES[::-1]), TIMES), text="Which video is this?")
    ]
    before = engine.get_stats()
    engine.generate(messages=inverted, sampling_params=GREEDY)
    result = engine.generate(messages=reversed_, sampling_params=GREEDY)
    after = engine.get_stats()

    start, _ = media_span(reversed_, result["meta_info"]["prompt_tokens"])
    assert result["meta_info"]["cached_tokens"] == start  # the text before the video only
    assert after.encoder_cache_queries - before.encoder_cache_queries == 2
    assert after.encoder_cache_hits == before.encoder_cache_hits


def test_mixed_batch_equals_each_request_alone(engine, reference) -> None:
    for name, result in zip(BATCH, generate(engine, BATCH), strict=True):
        assert_same_output(result, reference[name])


def test_chunked_prefill_inside_media_blocks_matches_unchunked(chunked_results, reference) -> None:
    for name in CHUNKED_BATCH:
        assert_same_output(chunked_results[name], reference[name])


def test_undecodable_media_fails_only_its_request(engine, reference) -> None:
    broken = [user(video_url(data_url(b"not a video", "video/mp4")), text="What is this?")]

    async def run() -> list[Any]:
        requests = [CONVERSATIONS["video"], broken, CONVERSATIONS["text"]]
        return await asyncio.gather(
            *(
                engine.async_generate(
                    messages=messages, sampling_params=GREEDY, top_logprobs_num=TOP_K
                )
                for messages in requests
            ),
            return_exceptions=True,
        )

    video_result, error, text_result = asyncio.run(run())
    assert isinstance(error, MediaError) and "cannot open video" in str(error)
    assert_same_output(video_result, reference["video"])
    assert_same_output(text_result, reference["text"])


def test_undecodable_image_in_a_list_fails_only_its_request(engine, reference) -> None:
    broken_image = {"type": "image_url", "image_url": {"url": data_url(b"junk", "image/png")}}
    broken = [user(broken_image, text="What is this?")]
    video_result, error, text_result = engine.generate(
        messages=[CONVERSATIONS["video"], broken, CONVERSATIONS["text"]],
        sampling_params=GREEDY,
        top_logprobs_num=TOP_K,
    )
    reason = error["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert "image" in reason["message"] and error["output_ids"] == []
    assert_same_output(video_result, reference["video"])
    assert_same_output(text_result, reference["text"])
    with pytest.raises(MediaError):  # alone, it raises
        engine.generate(messages=broken, sampling_params=GREEDY)


def test_media_too_long_for_the_context_aborts_only_its_request(chunked_results) -> None:
    ids = processor().process(TOO_LONG_ONCE_ENCODED).input_ids
    assert len(ids) + GREEDY["max_new_tokens"] < SHORT_CONTEXT  # the frontend lets it through
    aborted = chunked_results["too_long"]
    reason = aborted["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "context length" in reason["message"]
    assert aborted["output_ids"] == []
    # the other requests of the batch: test_chunked_prefill_inside_media_blocks_matches_unchunked


def test_repeated_video_file_is_decoded_and_encoded_once(
    engine, media_dir: Path, count_calls
) -> None:
    decodes = count_calls("read_video")
    conversation = [user(video_url("clip.mp4"), text="What is shown?")]
    before = engine.get_stats()
    first, again = (engine.generate(messages=conversation, sampling_params=GREEDY) for _ in "12")
    after = engine.get_stats()

    assert len(decodes) == 1
    assert after.encoder_cache_hits - before.encoder_cache_hits == 1
    _, end = media_span(conversation, again["meta_info"]["prompt_tokens"], str(media_dir))
    assert again["meta_info"]["cached_tokens"] >= end
    assert again["output_ids"] == first["output_ids"]


# --------------------------------------------------------------------------- frontend media cache


def write_video(path: Path, num_frames: int, rate: int = 25) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            frame = np.full((48, 64, 3), 8 * i % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def first_media(proc: QuicksviewerProcessor, part: dict) -> quicksviewer.MediaItem:
    return proc.process([user(part, text="What is shown?")]).media[0]


def test_video_file_is_decoded_once_per_sampling_options(tmp_path: Path, count_calls) -> None:
    shutil.copy(CLIP, tmp_path / "clip.mp4")
    proc = QuicksviewerProcessor.from_pretrained(MODEL, allowed_local_media_path=tmp_path)
    decodes = count_calls("read_video")

    first = first_media(proc, video_url("clip.mp4"))
    again = first_media(proc, video_url(f"file://{tmp_path}/clip.mp4"))  # same file
    assert len(decodes) == 1
    assert torch.equal(again.pixel_values, first.pixel_values)
    assert (again.content_hash, again.timestamps) == (first.content_hash, first.timestamps)

    denser = first_media(proc, video_url("clip.mp4", fps=2))
    fewer = first_media(proc, video_url("clip.mp4", max_frames=4))
    first_media(proc, video_url("clip.mp4", fps=2))
    assert len(decodes) == 3
    assert (first.num_views, denser.num_views, fewer.num_views) == (12, 24, 4)
    # other frames, other hash: the encoder cache and the pad ids tell them apart
    assert len({first.content_hash, denser.content_hash, fewer.content_hash}) == 3


def test_edited_video_file_is_decoded_again(tmp_path: Path, count_calls) -> None:
    path = tmp_path / "clip.mp4"
    shutil.copy(CLIP, path)
    proc = QuicksviewerProcessor.from_pretrained(MODEL, allowed_local_media_path=tmp_path)
    decodes = count_calls("read_video")
    original = first_media(proc, video_url("clip.mp4"))

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = first_media(proc, video_url("clip.mp4"))
    assert len(decodes) == 2 and touched.content_hash == original.content_hash

    write_video(path, num_frames=75)
    replaced = first_media(proc, video_url("clip.mp4"))
    assert len(decodes) == 3
    assert replaced.num_views == 3 and replaced.content_hash != original.content_hash


def test_inline_media_is_decoded_once_and_each_use_gets_its_span(count_calls) -> None:
    proc = QuicksviewerProcessor.from_pretrained(MODEL)
    video_decodes, image_decodes = count_calls("read_video"), count_calls("decode_image")
    clip = video_url(data_url(CLIP.read_bytes(), "video/mp4"))
    image = golden_image("c_qwen2_image_anyres", 0)
    for _ in range(2):
        result = proc.process([user(clip, image, image, text="Is the picture in the clip?")])

    assert len(video_decodes) == 1 and len(image_decodes) == 1
    assert (proc.media_cache.hits, proc.media_cache.queries) == (4, 6)
    video_span, first_image, second_image = (item.placeholder_span for item in result.media)
    assert video_span[1] == first_image[0] and first_image[1] == second_image[0]
    assert second_image[1] == len(result.placeholder_positions)


def test_media_cache_of_zero_bytes_decodes_every_time(count_calls) -> None:
    proc = QuicksviewerProcessor.from_pretrained(MODEL, media_cache_bytes=0)
    decodes = count_calls("decode_image")
    for _ in range(2):
        first_media(proc, golden_image("c_qwen2_image_anyres", 0))
    assert len(decodes) == 2 and len(proc.media_cache) == 0


def test_byte_bounded_lru_evicts_the_least_recently_used() -> None:
    cache: ByteBoundedLRU[str, bytes] = ByteBoundedLRU(10, len)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"
    cache.put("c", b"cccc")  # 12 bytes: evicts b, used longest ago
    assert cache.get("b") is None and cache.get("c") == b"cccc" and cache.used_bytes == 8
    cache.put("a", b"aaaaaa")  # a replaced entry is counted once, at its new size
    assert cache.used_bytes == 10 and len(cache) == 2
    cache.put("big", b"x" * 11)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("big") is None and len(cache) == 2
    assert (cache.hits, cache.queries) == (2, 4)


# --------------------------------------------------------------------------- encode stage


@functools.cache
def encode_stage() -> MultimodalEncodeStage:
    args = ServerArgs(model_path=str(MODEL), **ENGINE_ARGS)
    stage = create_encode_stage(ModelRunner(args, load_model_config(MODEL)).model)
    assert stage is not None
    return stage


def encode(conversation: list[dict]) -> Req:
    processed = processor().process(conversation)
    req = Req(
        rid="r",
        origin_input_ids=list(processed.input_ids),
        sampling_params=SamplingParams(),
        mm_inputs=processed,
    )
    encode_stage()(req)
    return req


def block_pad_ids(req: Req) -> list[int]:
    """The pad id of each media block in prompt order (a block is num_queries equal ids)."""
    pads = torch.tensor(req.origin_input_ids)[req.mm_mask].view(-1, encode_stage().num_queries)
    assert bool((pads == pads[:, :1]).all())
    assert req.mm_embeds.shape[0] == pads.numel()
    return pads[:, 0].tolist()


def test_pad_ids_of_nearby_content_hashes_never_overlap() -> None:
    vocab, content = 511, 123_456_789
    first = [pad_token_id(vocab, content, block) for block in range(64)]
    neighbour = [pad_token_id(vocab, content + 1, block) for block in range(64)]
    assert len(set(first)) == 64 and set(first).isdisjoint(neighbour)
    assert all(vocab <= pad < 2**63 for pad in first + neighbour)
    assert first == [pad_token_id(vocab, content, block) for block in range(64)]


def test_two_videos_in_one_request_get_disjoint_pad_ids() -> None:
    req = encode(
        [
            user(
                video(FRAMES, TIMES),
                video(np.ascontiguousarray(FRAMES[::-1]), TIMES),
                text="Are these the same?",
            )
        ]
    )
    first_blocks, second_blocks = (1 + len(cubes) for cubes in req.mm_meta["cubes"])
    pads = block_pad_ids(req)
    assert len(pads) == first_blocks + second_blocks
    first, second = pads[:first_blocks], pads[first_blocks:]
    assert len(set(first)) == first_blocks and len(set(second)) == second_blocks
    assert set(first).isdisjoint(second)
    assert min(pads) >= encode_stage().vocab_size


def test_one_video_shown_twice_in_a_request_is_encoded_once(monkeypatch) -> None:
    flipped = np.ascontiguousarray(G_FRAMES[:, ::-1])
    stage = encode_stage()
    tower = stage.model.vision.tower_features
    encoded_views: list[int] = []

    def counting_tower(pixels: torch.Tensor) -> torch.Tensor:
        encoded_views.append(pixels.shape[0])
        return tower(pixels)

    monkeypatch.setattr(stage.model.vision, "tower_features", counting_tower)
    req = encode([user(video(flipped, G_TIMES), video(flipped, G_TIMES), text="Twice?")])
    assert encoded_views == [len(G_FRAMES)]
    pads = block_pad_ids(req)
    half = len(pads) // 2
    assert pads[:half] == pads[half:]
    rows = req.mm_embeds.shape[0] // 2
    assert torch.equal(req.mm_embeds[:rows], req.mm_embeds[rows:])


def test_video_and_image_in_the_last_turn_only() -> None:
    conversation = CONVERSATIONS["media_in_last_turn"]
    processed = processor().process(conversation)
    start = processed.input_ids.index(IMAGE_PLACEHOLDER_ID)
    req = encode(conversation)

    assert req.origin_input_ids[:start] == processed.input_ids[:start]  # earlier turns as is
    assert int(req.mm_mask.nonzero()[0]) == start
    video_blocks = 1 + len(req.mm_meta["cubes"][0])
    pads = block_pad_ids(req)
    assert len(pads) == video_blocks + processed.media[1].num_views
    assert set(pads[:video_blocks]).isdisjoint(pads[video_blocks:])


def sent_media(sent: list[Any]) -> list[Any]:
    """Pixels (a PixelFile, or None when by reference) of each video request sent."""
    return [
        message.mm_inputs.media[0].pixels
        for message in sent
        if isinstance(message, TokenizedGenerateReq) and message.mm_inputs is not None
    ]


def record_sent(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    manager = engine.tokenizer_manager
    sent: list[Any] = []
    send = manager._send

    def recording(message: Any) -> None:
        sent.append(message)
        send(message)

    monkeypatch.setattr(manager, "_send", recording)
    return sent


@pytest.fixture
def sent_messages(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return record_sent(engine, monkeypatch)


def test_repeat_video_travels_by_reference(engine, sent_messages) -> None:
    flipped = [user(video(np.ascontiguousarray(FRAMES[:, ::-1]), TIMES), text="And this one?")]
    first = engine.generate(messages=flipped, sampling_params=GREEDY)
    again = engine.generate(messages=flipped, sampling_params=GREEDY)

    by_file, by_reference = sent_media(sent_messages)
    assert isinstance(by_file, PixelFile) and by_reference is None
    assert not Path(by_file.path).exists()  # the engine read it and deleted it
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["finish_reason"]["type"] == "length"


def test_media_the_engine_no_longer_holds_is_resent(engine, sent_messages) -> None:
    """The frontend believes the engine holds a video it never saw (as after an eviction): the
    engine answers ``media_not_cached`` and the frontend resends the pixels by file."""
    swapped = [user(video(np.ascontiguousarray(FRAMES[..., ::-1]), TIMES), text="Colors?")]
    manager = engine.tokenizer_manager
    _, processed = manager.messages_processor(swapped)
    manager._media._engine_has[media_key(processed.media[0])] = None
    before = engine.get_stats()

    result = engine.generate(messages=swapped, sampling_params=GREEDY)
    again = engine.generate(messages=swapped, sampling_params=GREEDY)

    by_reference, resent, by_reference_again = sent_media(sent_messages)
    assert by_reference is None and isinstance(resent, PixelFile) and by_reference_again is None
    stats = engine.get_stats()
    assert stats.encoder_cache_queries - before.encoder_cache_queries == 3
    assert stats.encoder_cache_hits - before.encoder_cache_hits == 1  # the last request
    assert result["meta_info"]["finish_reason"]["type"] == "length"
    assert len(result["output_ids"]) == GREEDY["max_new_tokens"]
    assert again["output_ids"] == result["output_ids"]


def test_same_new_video_sent_concurrently_is_written_once(engine, sent_messages) -> None:
    """Two requests with one new video at once: one carries the pixels, the other refers to
    them and is sent after it; the engine encodes once (the second request takes the
    encoding from the cache when the first has made it) and nothing is resent."""
    upside_down = [user(video(np.ascontiguousarray(FRAMES[:, ::-1, ::-1]), TIMES), text="Hm?")]

    async def run() -> list[Any]:
        return await asyncio.gather(
            *(engine.async_generate(messages=upside_down, sampling_params=GREEDY) for _ in "12")
        )

    before = engine.get_stats()
    first, second = asyncio.run(run())
    after = engine.get_stats()
    by_file, by_reference = sent_media(sent_messages)  # in the order they were sent
    assert isinstance(by_file, PixelFile) and by_reference is None
    # A lookup per arrival, and one more by the second if it arrived while the first encoded.
    assert after.encoder_cache_queries - before.encoder_cache_queries in (2, 3)
    assert after.encoder_cache_hits - before.encoder_cache_hits == 1
    assert first["output_ids"] == second["output_ids"]
    assert first["meta_info"]["finish_reason"]["type"] == "length"


# --------------------------------------------------------------------------- encoder cache size


def encode_with(stage: MultimodalEncodeStage, conversation: list[dict]) -> Req:
    processed = processor().process(conversation)
    req = Req("r", list(processed.input_ids), SamplingParams(), mm_inputs=processed)
    stage(req)
    return req


def test_encoder_cache_evicts_at_its_set_size() -> None:
    model = encode_stage().model
    videos = [
        [user(video(frames, TIMES), text="Which one?")]
        for frames in (255 - FRAMES, np.ascontiguousarray(FRAMES[::-1]), FRAMES[:, ::-1] // 2)
    ]
    keys = [media_key(processor().process(v).media[0]) for v in videos]
    sizing = create_encode_stage(model, cache_bytes=1 << 30)
    sizes = []
    for conversation, key in zip(videos, keys, strict=True):
        encode_with(sizing, conversation)
        sizes.append(sizing.cache.get(key).nbytes)

    capacity = sizes[0] + sizes[1]  # room for the first two only
    stage = create_encode_stage(model, cache_bytes=capacity)
    for conversation in videos[:2]:
        encode_with(stage, conversation)
    assert len(stage.cache) == 2 and stage.cache.used_bytes == capacity
    encode_with(stage, videos[2])  # evicts the least recently used: the first
    assert stage.cache.used_bytes <= capacity
    assert stage.cache.get(keys[0]) is None and stage.cache.get(keys[2]) is not None


def test_encoder_cache_of_zero_bytes_encodes_every_time() -> None:
    stage = create_encode_stage(encode_stage().model, cache_bytes=0)
    conversation = [user(video(FRAMES, TIMES), text="Again?")]
    first, again = (encode_with(stage, conversation) for _ in "12")
    assert len(stage.cache) == 0 and stage.cache.hits == 0 and stage.cache.queries == 2
    assert torch.equal(first.mm_embeds, again.mm_embeds)


def test_the_scheduler_sizes_its_encoder_cache_by_the_flag() -> None:
    args = ServerArgs(model_path=str(MODEL), mm_encoder_cache_mb=3, **ENGINE_ARGS)
    scheduler = build_scheduler(args)
    assert scheduler.mm_encoder.cache.capacity_bytes == 3 << 20
    assert create_encode_stage(scheduler.runner.model, cache_bytes=0).cache.capacity_bytes == 0
    assert create_encode_stage(torch.nn.Linear(2, 2)) is None  # text-only: no stage


@pytest.fixture(scope="module")
def uncached_engine() -> Iterator[Engine]:
    with Engine(str(MODEL), mm_encoder_cache_mb=0, **ENGINE_ARGS) as engine:
        yield engine


def test_without_an_encoder_cache_a_repeated_video_is_sent_and_encoded_again(
    uncached_engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = record_sent(uncached_engine, monkeypatch)
    before = uncached_engine.get_stats()
    first, again = (generate(uncached_engine, ["video"])[0] for _ in "12")
    after = uncached_engine.get_stats()

    assert all(isinstance(pixels, PixelFile) for pixels in sent_media(sent))
    assert len(sent_media(sent)) == 2  # no reference, so no miss and no resend
    assert after.encoder_cache_queries - before.encoder_cache_queries == 2
    assert after.encoder_cache_hits == before.encoder_cache_hits
    assert_same_output(first, reference["video"])
    assert_same_output(again, reference["video"])


def test_a_request_whose_pixels_are_gone_fails_instead_of_looping(
    uncached_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine finds no pixel file (nothing to resend: the request referenced nothing): the
    request ends with the engine's error rather than being resent forever or hanging."""
    sent = record_sent(uncached_engine, monkeypatch)
    media = uncached_engine.tokenizer_manager._media
    wire_form = media.wire_form

    def losing_files(req: Any) -> Any:
        wire = wire_form(req)
        for item in wire.mm_inputs.media:
            Path(item.pixels.path).unlink()
        return wire

    monkeypatch.setattr(media, "wire_form", losing_files)
    conversation = [user(video(FRAMES, TIMES), text="Still there?")]
    coroutine = uncached_engine.async_generate(messages=conversation, sampling_params=GREEDY)
    result = asyncio.run(asyncio.wait_for(coroutine, timeout=120))

    reason = result["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "gone" in reason["message"]
    assert result["output_ids"] == [] and len(sent_media(sent)) == 1
