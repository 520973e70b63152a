"""Vision encoding spread over scheduler steps, on the golden tiny Quicksviewer checkpoint (CPU,
float32): running requests keep decoding while a video is encoded one tower batch per step, the
result equals encoding it at once, and concurrent requests for one new video encode it once."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
import torch
from test_multimodal_engine import FRAMES, MODEL, TIMES, processor, user, video

from cubeserve.engine.io_struct import TokenizedGenerateReq, TokenOutput
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.multimodal.cache import ByteBoundedLRU
from cubeserve.multimodal.processors import engine_inputs
from cubeserve.scheduler.scheduler import Scheduler, build_scheduler
from cubeserve.server_args import ServerArgs

TOWER_BATCH = 5
NUM_TOWER_BATCHES = 5  # of the 24 frames


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True
    ).normalize()


@pytest.fixture(scope="module")
def scheduler() -> Scheduler:
    args = ServerArgs(
        model_path=str(MODEL), dtype="float32", max_total_tokens=8192, vision_batch_size=TOWER_BATCH
    )
    return build_scheduler(args)


@pytest.fixture
def tower_calls(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of views of every vision-tower call from now on."""
    vision = scheduler.runner.model.vision
    tower = vision.tower_features
    calls: list[int] = []

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return tower(pixels)

    monkeypatch.setattr(vision, "tower_features", counting)
    return calls


def video_req(rid: str, frames: np.ndarray, by_reference: bool = False) -> TokenizedGenerateReq:
    input_ids, processed = engine_inputs(
        processor().process([user(video(frames, TIMES), text="What is moving?")])
    )
    if by_reference:
        processed.media = [dataclasses.replace(item, pixels=None) for item in processed.media]
    return TokenizedGenerateReq(rid, input_ids, greedy(8), mm_inputs=processed)


def text_req(rid: str, max_new_tokens: int = 400) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid, list(range(10, 30)), greedy(max_new_tokens))


def step(scheduler: Scheduler, results: dict[str, list[TokenOutput]]) -> None:
    for out in scheduler.step():
        results.setdefault(out.rid, []).append(out)


def run_all(scheduler: Scheduler, results: dict[str, list[TokenOutput]]) -> None:
    for _ in range(10_000):
        if not scheduler.has_work:
            return
        step(scheduler, results)
    raise AssertionError("the scheduler did not finish")


def output_ids(outputs: list[TokenOutput]) -> list[int]:
    return [token for out in outputs for token in out.new_token_ids]


def fresh_frames(seed: int) -> np.ndarray:
    """A video the encoder cache has never seen: FRAMES with a few pixels changed."""
    frames = FRAMES.copy()
    frames[:, seed % frames.shape[1], :2] ^= 0xFF
    return frames


def test_a_video_is_encoded_in_one_step_when_nothing_else_runs(scheduler, tower_calls) -> None:
    scheduler.add_request(video_req("alone", fresh_frames(1)))
    results: dict[str, list[TokenOutput]] = {}
    step(scheduler, results)
    # Uploaded one tower batch at a time, so no more than a batch of pixels is pinned at once.
    assert tower_calls == [5, 5, 5, 5, 4]
    assert not scheduler.encoding and scheduler.running  # encoded and prefilled in one step
    run_all(scheduler, results)
    assert len(output_ids(results["alone"])) == 8


def test_running_requests_decode_while_a_video_is_encoded_batch_by_batch(
    scheduler, tower_calls
) -> None:
    frames = fresh_frames(2)
    alone: dict[str, list[TokenOutput]] = {}
    scheduler.add_request(video_req("reference", frames))
    run_all(scheduler, alone)
    assert scheduler.flush_cache()
    stage = scheduler.mm_encoder
    stage.cache = ByteBoundedLRU(1 << 30, lambda entry: entry.nbytes)  # forget the encoding
    tower_calls.clear()

    results: dict[str, list[TokenOutput]] = {}
    stream = text_req("stream")
    stream.stream = True
    scheduler.add_request(stream)
    step(scheduler, results)
    scheduler.add_request(video_req("video", frames))
    for _ in range(NUM_TOWER_BATCHES):
        before = len(output_ids(results["stream"]))
        step(scheduler, results)
        assert len(output_ids(results["stream"])) == before + 1  # the stream never waits
    assert tower_calls == [5, 5, 5, 5, 4]
    assert not scheduler.encoding and "video" not in results
    scheduler.abort_request("stream")
    run_all(scheduler, results)
    # The same tower batches as the whole encoding: the same prompt, the same tokens.
    assert output_ids(results["video"]) == output_ids(alone["reference"])
    assert results["video"][-1].prompt_tokens == alone["reference"][-1].prompt_tokens


def owner_and_borrower(
    scheduler: Scheduler,
    results: dict[str, list[TokenOutput]],
    frames: np.ndarray,
    owner: str,
    borrower: str,
) -> None:
    """A stream ("busy") keeps the engine busy; then ``owner`` brings new frames and
    ``borrower`` the same frames by reference."""
    scheduler.add_request(text_req("busy"))
    step(scheduler, results)
    scheduler.add_request(video_req(owner, frames))
    scheduler.add_request(video_req(borrower, frames, by_reference=True))


def test_a_by_reference_request_waits_for_the_job_encoding_its_video(
    scheduler, tower_calls
) -> None:
    results: dict[str, list[TokenOutput]] = {}
    owner_and_borrower(scheduler, results, fresh_frames(3), "first", "second")
    assert [job.req.rid for job in scheduler.encoding] == ["first", "second"]
    for _ in range(NUM_TOWER_BATCHES + 2):
        step(scheduler, results)
    scheduler.abort_request("busy")
    run_all(scheduler, results)
    assert sum(tower_calls) == len(FRAMES)  # encoded once, for both
    assert results["second"][-1].finish_reason["type"] == "length"
    assert output_ids(results["second"]) == output_ids(results["first"])


def test_a_by_reference_request_whose_encoder_was_aborted_asks_for_the_pixels(
    scheduler, tower_calls
) -> None:
    results: dict[str, list[TokenOutput]] = {}
    owner_and_borrower(scheduler, results, fresh_frames(4), "owner", "borrower")
    step(scheduler, results)  # the owner's first tower batch
    scheduler.abort_request("owner")
    step(scheduler, results)
    reason = results["borrower"][-1].finish_reason
    assert reason["type"] == "abort" and reason["media_not_cached"] is True
    assert results["owner"][-1].finish_reason["type"] == "abort"
    scheduler.abort_request("busy")
    run_all(scheduler, results)
    gc.collect()
    assert not scheduler.encoding and not scheduler.mm_encoder.encoding_now
    assert scheduler.flush_cache()
    assert scheduler.allocator.used_size() == 0


def test_vision_batch_size_flag(scheduler: Scheduler) -> None:
    from cubeserve.launch_server import parse_server_args

    assert parse_server_args([]).vision_batch_size == 64
    assert parse_server_args(["--vision-batch-size", "16"]).vision_batch_size == 16
    with pytest.raises(ValueError, match="--vision-batch-size must be >= 1"):
        ServerArgs(vision_batch_size=0)
    # The fixture's flag sets the tower's own batch, so whole and step-wise encodings agree.
    assert scheduler.mm_encoder.tower_batch == TOWER_BATCH
    assert scheduler.runner.model.vision.vision_tower.max_batch_size == TOWER_BATCH
