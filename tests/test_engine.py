"""The offline Engine end to end: engine subprocess, ZMQ, tokenizer manager, streaming.

Tiny random checkpoints (CPU, fp32) with a locally trained byte-level BPE tokenizer; greedy
outputs are compared with transformers' ``generate``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from model_factory import FAMILIES, load_hf_model

from cubeserve.engine.engine import Engine

PROMPT_LENS = [3, 9, 17, 24, 31, 40, 50, 66]
NEW_TOKENS = 32
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine_for(tiny_checkpoint: Callable[[str], Path]) -> Iterator[Callable[..., Engine]]:
    """One shared Engine per (family, options) for the whole module."""
    engines: dict[tuple, Engine] = {}

    def get(family: str = "qwen2", **server_args) -> Engine:
        server_args.setdefault("max_total_tokens", 4096)  # several engines share one GPU
        key = (family, *sorted(server_args.items()))
        if key not in engines:
            engines[key] = Engine(str(tiny_checkpoint(family)), **server_args)
        return engines[key]

    yield get
    for engine in engines.values():
        engine.shutdown()


def token_prompts(lens: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lens]


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = load_hf_model(path)
    outputs = []
    for prompt in prompts:
        ids = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


def wait_until_idle(engine: Engine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not engine.flush_cache():
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_batch_matches_transformers(engine_for, tiny_checkpoint, family: str) -> None:
    engine = engine_for(family, chunked_prefill_size=16)
    prompts = token_prompts(PROMPT_LENS)
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [r["output_ids"] for r in results] == hf_greedy(
        tiny_checkpoint(family), prompts, NEW_TOKENS
    )
    for result, prompt in zip(results, prompts):
        meta = result["meta_info"]
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == NEW_TOKENS
        assert meta["finish_reason"] == {"type": "length", "matched": None}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_tiny_pool_finishes_every_request_correctly(
    engine_for, tiny_checkpoint, overlap: bool
) -> None:
    # The longest request (66 + 32 tokens) just fits, the batch needs far more.
    engine = engine_for(
        "qwen2", max_total_tokens=100, chunked_prefill_size=16, enable_overlap_schedule=overlap
    )
    assert engine.get_stats().kv_pool_capacity_tokens == 100
    prompts = token_prompts(PROMPT_LENS)
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [r["output_ids"] for r in results] == hf_greedy(
        tiny_checkpoint("qwen2"), prompts, NEW_TOKENS
    )
    wait_until_idle(engine)
    assert engine.get_stats().kv_pool_used_tokens == 0


def test_shared_prefixes_hit_the_cache_with_unchanged_outputs(engine_for) -> None:
    shared = token_prompts([40], seed=1)[0]
    prompts = [shared + tail for tail in token_prompts([4, 9, 2, 13], seed=2)]
    expected = engine_for("qwen2", disable_radix_cache=True).generate(
        input_ids=prompts, sampling_params=GREEDY
    )

    engine = engine_for("qwen2")
    before = engine.get_stats()
    first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
    rest = engine.generate(input_ids=prompts[1:], sampling_params=GREEDY)
    assert [r["output_ids"] for r in [first, *rest]] == [r["output_ids"] for r in expected]
    assert all(r["meta_info"]["cached_tokens"] >= len(shared) for r in rest)
    assert all(r["meta_info"]["cached_tokens"] == 0 for r in expected)
    after = engine.get_stats()
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens >= 3 * len(shared)


def test_stream_chunks_add_up_to_the_final_text(engine_for) -> None:
    engine = engine_for("qwen2")
    params = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    final = engine.generate("The quick brown fox", params)
    chunks = list(engine.generate("The quick brown fox", params, stream=True))
    assert len(chunks) > 1
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"] == final["text"]
    assert chunks[-1]["output_ids"] == final["output_ids"]
    assert [c["meta_info"]["finish_reason"] is None for c in chunks] == [True] * (
        len(chunks) - 1
    ) + [False]


def test_stop_string_never_reaches_the_text(engine_for) -> None:
    engine = engine_for("qwen2")
    params = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    full = engine.generate("The weather is", params)["text"]
    stop = full[6:9]
    expected_text = full[: full.index(stop)]
    chunks = list(engine.generate("The weather is", {**params, "stop": stop}, stream=True))
    assert "".join(c["delta"] for c in chunks) == chunks[-1]["text"] == expected_text
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_closing_a_stream_aborts_and_frees_the_pool(engine_for, overlap: bool) -> None:
    engine = engine_for("qwen2", enable_overlap_schedule=overlap)
    stream = engine.generate(
        input_ids=token_prompts([20], seed=3)[0],
        sampling_params={"max_new_tokens": 400, "ignore_eos": True},
        stream=True,
    )
    for _, chunk in zip(range(3), stream):
        assert chunk["meta_info"]["finish_reason"] is None
    stream.close()
    wait_until_idle(engine)
    stats = engine.get_stats()
    assert stats.kv_pool_used_tokens == 0 and stats.num_running_reqs == 0


def test_n_samples_with_a_seed_are_reproducible(engine_for) -> None:
    engine = engine_for("qwen2")
    params = {"max_new_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7, "ignore_eos": True}
    first = engine.generate("Once upon a time", params)
    again = engine.generate("Once upon a time", params)
    assert len(first) == 3
    assert [r["output_ids"] for r in first] == [r["output_ids"] for r in again]
    assert len({tuple(r["output_ids"]) for r in first}) > 1  # the samples are seeded apart


def test_logprobs_follow_the_tokens(engine_for) -> None:
    engine = engine_for("qwen2")
    result = engine.generate(
        "Hello",
        {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True,
        top_logprobs_num=3,
    )
    meta = result["meta_info"]
    assert [token for _, token, _ in meta["output_token_logprobs"]] == result["output_ids"]
    for (logprob, token, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == token  # greedy picks the most likely token
        assert logprob == pytest.approx(top[0][0])


def test_chat_messages_and_async_generate(engine_for) -> None:
    engine = engine_for("qwen2")
    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    prompt = engine.tokenizer_manager.apply_chat_template(messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    expected = engine.generate(prompt, params)

    async def run() -> tuple[dict, list[dict]]:
        result = await engine.async_generate(messages=messages, sampling_params=params)
        chunks = [
            chunk
            async for chunk in await engine.async_generate(
                messages=messages, sampling_params=params, stream=True
            )
        ]
        return result, chunks

    result, chunks = asyncio.run(run())
    assert result["output_ids"] == expected["output_ids"]
    assert chunks[-1]["text"] == expected["text"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "Hi", "sampling_params": {"max_new_tokens": 600}}, "max_new_tokens"),
        ({"prompt": "Hi", "sampling_params": {"temperature": -1.0}}, "temperature"),
        ({"prompt": "Hi", "sampling_params": {"bogus": 1}}, "bogus"),
        ({"prompt": ""}, "prompt is empty"),
        ({"input_ids": [1, 100_000]}, "input_ids"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
        ),
    ],
)
def test_invalid_requests_raise_value_error(engine_for, kwargs: dict, message: str) -> None:
    engine = engine_for("qwen2")
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)
    assert engine.get_stats().num_waiting_reqs == 0


def assert_rejected(result: dict, message: str) -> None:
    """``result`` is a request refused before it ran, as the engine reports one."""
    reason = result["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert message in reason["message"]
    assert result["text"] == "" and result["output_ids"] == []
    assert result["meta_info"]["completion_tokens"] == 0


def test_invalid_requests_in_a_list_fail_alone(engine_for) -> None:
    engine = engine_for("qwen2")
    params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    expected = engine.generate(["Hi", "Hello"], params)
    results = engine.generate(
        ["Hi", "Hi", "Hi", "Hello"],
        [params, {"temperature": -1.0}, {**params, "n": 2, "max_new_tokens": 600}, params],
        return_logprob=True,
    )
    assert len(results) == 5  # the rejected n=2 request keeps its two places
    assert results[0]["output_ids"] == expected[0]["output_ids"]
    assert_rejected(results[1], "temperature")
    assert_rejected(results[2], "max_new_tokens")
    assert_rejected(results[3], "max_new_tokens")
    assert results[1]["meta_info"]["output_token_logprobs"] == []
    assert results[4]["output_ids"] == expected[1]["output_ids"]
    assert results[4]["meta_info"]["finish_reason"]["type"] == "length"
    # A list of one is a list: its error is a result too. A single request still raises.
    (only,) = engine.generate(input_ids=[[1, 100_000]])
    assert_rejected(only, "input_ids")
    with pytest.raises(ValueError, match="input_ids"):
        engine.generate(input_ids=[1, 100_000])
    assert engine.get_stats().num_waiting_reqs == 0


def test_invalid_request_in_a_streamed_or_async_list(engine_for) -> None:
    engine = engine_for("qwen2")
    params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    bad_messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    good_messages = [{"role": "user", "content": "Hello"}]
    expected = engine.generate(messages=good_messages, sampling_params=params)

    chunks = list(
        engine.generate(messages=[bad_messages, good_messages], sampling_params=params, stream=True)
    )
    (rejected,) = [c for c in chunks if c["index"] == 0]
    assert_rejected(rejected, "text content only")
    assert rejected["delta"] == ""
    assert [c for c in chunks if c["index"] == 1][-1]["text"] == expected["text"]

    async def run() -> list[dict]:
        return await engine.async_generate(
            messages=[good_messages, bad_messages], sampling_params=params
        )

    good, bad = asyncio.run(run())
    assert good["output_ids"] == expected["output_ids"]
    assert_rejected(bad, "text content only")


def test_startup_errors_are_raised_in_the_caller(tiny_checkpoint, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint("qwen2"), broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(
        json.dumps({**config, "architectures": ["NoSuchForCausalLM"]})
    )
    with pytest.raises(ValueError, match="NoSuchForCausalLM"):
        Engine(str(broken))
