"""Scheduler + ModelRunner in one process: prefix reuse, chunked prefill, retraction, abort,
stop conditions, policies and multimodal rows, on a tiny random Qwen2 checkpoint (CPU, fp32)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cubeserve.engine.forward_batch import ForwardMode
from cubeserve.engine.io_struct import TokenizedGenerateReq, TokenOutput
from cubeserve.engine.model_runner import ModelRunner, load_model_config
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.mem_cache.kv_pool import ReqToTokenPool
from cubeserve.scheduler.request import Req
from cubeserve.scheduler.schedule_batch import InflightBatch, ScheduleBatch
from cubeserve.scheduler.schedule_policy import SchedulePolicy
from cubeserve.scheduler.scheduler import Scheduler, default_chunked_prefill_size
from cubeserve.server_args import ServerArgs

PROMPT_LENS = [5, 17, 33, 8, 40, 3, 25, 12]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    from cubeserve.engine.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def make_scheduler(checkpoint: Path, tokenizer=None, eos_token_ids=(), **kwargs) -> Scheduler:
    args = ServerArgs(model_path=str(checkpoint), **kwargs)
    return Scheduler(
        args, ModelRunner(args, load_model_config(checkpoint)), tokenizer, eos_token_ids
    )


def prompts(lens: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lens]


def greedy(max_new_tokens: int = MAX_NEW_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kwargs
    ).normalize()


def submit(
    scheduler: Scheduler,
    input_ids: list[int],
    rid: str,
    params: SamplingParams | None = None,
    **fields,
) -> None:
    scheduler.add_request(TokenizedGenerateReq(rid, input_ids, params or greedy(), **fields))


def collect(outputs: list[TokenOutput], results: dict[str, dict]) -> None:
    for out in outputs:
        result = results.setdefault(
            out.rid, {"ids": [], "finish": None, "cached": 0, "logprobs": [], "top_logprobs": []}
        )
        result["ids"] += out.new_token_ids
        result["logprobs"] += out.new_logprobs or []
        result["top_logprobs"] += out.new_top_logprobs or []
        result["finish"] = out.finish_reason
        result["cached"] = out.cached_tokens


def run_all(scheduler: Scheduler, max_steps: int = 10_000) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(max_steps):
        if not scheduler.has_work:
            return results
        collect(scheduler.step(), results)
    raise AssertionError("the scheduler did not finish")


def generate(
    scheduler: Scheduler, input_ids: list[list[int]], params: SamplingParams | None = None
) -> list[dict]:
    for i, ids in enumerate(input_ids):
        submit(scheduler, ids, str(i), params)
    results = run_all(scheduler)
    return [results[str(i)] for i in range(len(input_ids))]


def assert_pool_empty_after_flush(scheduler: Scheduler) -> None:
    assert scheduler.flush_cache()
    assert scheduler.allocator.used_size() == 0
    pool = scheduler.req_to_token_pool
    assert pool.available_size() == pool.size


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[list[int]]:
    """Greedy outputs of PROMPT_LENS prompts with a roomy pool and no chunking."""
    results = generate(make_scheduler(checkpoint), prompts(PROMPT_LENS))
    return [r["ids"] for r in results]


# ---------------------------------------------------------------------------- runner level


def extend_logits(runner: ModelRunner, req: Req, n: int) -> torch.Tensor:
    slots = runner.token_allocator.alloc(n)
    batch = ScheduleBatch.extend([req], [n]).to_forward_batch(
        slots, runner.req_to_token_pool, runner.device
    )
    logits = runner.forward(batch)
    req.kv_len += n
    return logits


def test_prefix_reuse_gives_the_logits_of_a_full_prefill(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint)
    runner, cache = scheduler.runner, scheduler.tree_cache
    shared, first_tail, second_tail = prompts([30, 10, 15], seed=1)

    def new_req(ids: list[int]) -> Req:
        req = Req(rid=str(len(ids)), origin_input_ids=ids, sampling_params=greedy())
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        return req

    first = new_req(shared + first_tail)
    extend_logits(runner, first, len(first.origin_input_ids))
    slots = runner.req_to_token_pool.req_to_token[first.req_pool_idx, : first.kv_len]
    assert cache.insert(first.origin_input_ids, slots) == 0

    fresh = new_req(shared + second_tail)
    expected = extend_logits(runner, fresh, len(fresh.origin_input_ids))

    reused = new_req(shared + second_tail)
    prefix, _ = cache.match_prefix(reused.origin_input_ids)
    assert prefix.numel() == len(shared)
    runner.req_to_token_pool.req_to_token[reused.req_pool_idx, : len(shared)] = prefix
    reused.kv_len = len(shared)
    actual = extend_logits(runner, reused, len(second_tail))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_extend_batch_slices_media_rows_per_chunk() -> None:
    ids = list(range(14))
    mask = torch.zeros(14, dtype=torch.bool)
    mask[2:6] = mask[10:12] = True
    embeds = torch.arange(6, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # row i is all i
    req = Req(
        rid="mm", origin_input_ids=ids, sampling_params=greedy(), mm_embeds=embeds, mm_mask=mask
    )
    text = Req(rid="text", origin_input_ids=[1, 2, 3], sampling_params=greedy())
    pool = ReqToTokenPool(2, 32, "cpu")
    req.req_pool_idx, text.req_pool_idx = pool.alloc(), pool.alloc()
    req.kv_len = 4  # the chunk [4, 11)

    batch = ScheduleBatch.extend([text, req], [3, 7]).to_forward_batch(
        torch.arange(1, 11), pool, torch.device("cpu")
    )
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert batch.positions.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert batch.mm_mask.tolist() == [False] * 3 + [True, True, False, False, False, False, True]
    assert batch.mm_embeds[:, 0].tolist() == [2, 3, 4]  # rows of positions 4, 5 and 10
    assert pool.req_to_token[req.req_pool_idx, 4:11].tolist() == list(range(4, 11))
    assert batch.seq_lens_cpu == [3, 11] and batch.extend_prefix_lens_cpu == [0, 4]


def test_lpm_puts_the_longest_cached_prefix_first(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint)
    cached = list(range(1, 21))
    scheduler.tree_cache.insert(cached, scheduler.allocator.alloc(20))
    waiting = [
        Req(rid=rid, origin_input_ids=ids, sampling_params=greedy())
        for rid, ids in [("none", [99] * 5), ("short", cached[:4] + [0]), ("long", cached + [0])]
    ]
    lpm = list(waiting)
    SchedulePolicy("lpm", scheduler.tree_cache).sort_waiting(lpm)
    assert [r.rid for r in lpm] == ["long", "short", "none"]
    fcfs = list(waiting)
    SchedulePolicy("fcfs", scheduler.tree_cache).sort_waiting(fcfs)
    assert [r.rid for r in fcfs] == ["none", "short", "long"]


# ---------------------------------------------------------------------------- scheduling


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_chunked_prefill_under_both_policies_matches_the_reference(
    checkpoint: Path, reference: list[list[int]], policy: str
) -> None:
    scheduler = make_scheduler(checkpoint, chunked_prefill_size=16, schedule_policy=policy)
    results = generate(scheduler, prompts(PROMPT_LENS))
    assert [r["ids"] for r in results] == reference
    assert all(r["finish"] == {"type": "length", "matched": None} for r in results)
    assert_pool_empty_after_flush(scheduler)


def test_shared_prefixes_hit_the_cache_with_unchanged_outputs(checkpoint: Path) -> None:
    shared = prompts([24], seed=2)[0]
    inputs = [shared + tail for tail in prompts([3, 9, 5, 7], seed=3)]
    expected = [
        r["ids"] for r in generate(make_scheduler(checkpoint, disable_radix_cache=True), inputs)
    ]

    scheduler = make_scheduler(checkpoint, schedule_policy="lpm")
    first = generate(scheduler, inputs[:1])  # the prefix is cached when this one finishes
    rest = generate(scheduler, inputs[1:])
    assert [r["ids"] for r in first + rest] == expected
    assert all(r["cached"] >= len(shared) for r in rest)
    stats = scheduler.get_stats()
    assert stats.prefix_cache_hit_tokens >= 3 * len(shared)
    assert stats.prefix_cache_query_tokens == sum(map(len, inputs))


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill-only"])
def test_tiny_pool_retracts_and_still_finishes_everything_correctly(
    checkpoint: Path, reference: list[list[int]], mixed: bool
) -> None:
    # The longest request (40 + 24 tokens) just fits; all together need far more.
    scheduler = make_scheduler(
        checkpoint, max_total_tokens=72, chunked_prefill_size=16, enable_mixed_chunk=mixed
    )
    results = generate(scheduler, prompts(PROMPT_LENS))
    assert [r["ids"] for r in results] == reference
    assert scheduler.get_stats().num_retracted_reqs == scheduler.num_retracted_reqs > 0
    assert_pool_empty_after_flush(scheduler)


def test_abort_frees_waiting_chunked_and_running_requests(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint, chunked_prefill_size=8)
    long_prompt, short_prompt = prompts([40, 6], seed=4)
    submit(scheduler, short_prompt, "running", greedy(200))
    results: dict[str, dict] = {}
    collect(scheduler.step(), results)  # prefills "running"
    submit(scheduler, long_prompt, "chunked", greedy(200))
    collect(scheduler.step(), results)  # first chunk of "chunked"
    submit(scheduler, short_prompt, "waiting", greedy(200))
    collect(scheduler.step(), results)  # second chunk; "waiting" must wait for the chunked one
    assert scheduler.chunked_req is not None and scheduler.chunked_req.rid == "chunked"
    assert [r.rid for r in scheduler.running] == ["running"]
    assert [r.rid for r in scheduler.waiting] == ["waiting"]

    for rid in ("waiting", "chunked", "running"):
        scheduler.abort_request(rid)
    collect(scheduler.step(), results)
    assert not scheduler.has_work
    for rid in ("waiting", "chunked", "running"):
        assert results[rid]["finish"]["type"] == "abort"
    assert results["running"]["ids"]  # it had generated before the abort
    assert_pool_empty_after_flush(scheduler)


def test_flush_is_refused_while_requests_are_in_flight(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint)
    submit(scheduler, prompts([5])[0], "a")
    assert not scheduler.flush_cache()
    run_all(scheduler)
    assert scheduler.flush_cache()


# ---------------------------------------------------------------------------- stop conditions


def test_stop_token_ids_and_eos(checkpoint: Path, reference: list[list[int]]) -> None:
    prompt, expected = prompts(PROMPT_LENS)[1], reference[1]
    stop_token = expected[5]
    cut = expected.index(stop_token) + 1

    (result,) = generate(make_scheduler(checkpoint), [prompt], greedy(stop_token_ids=[stop_token]))
    assert result["ids"] == expected[:cut]
    assert result["finish"] == {"type": "stop", "matched": stop_token}

    with_eos = make_scheduler(checkpoint, eos_token_ids=[stop_token])
    eos_params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0).normalize()
    (result,) = generate(with_eos, [prompt], eos_params)
    assert result["ids"] == expected[:cut] and result["finish"]["matched"] == stop_token
    (result,) = generate(with_eos, [prompt], greedy())  # ignore_eos
    assert result["ids"] == expected and result["finish"]["type"] == "length"


def test_stop_strings_end_generation_at_the_completing_token(
    checkpoint: Path, tokenizer, reference
) -> None:
    prompt, expected = prompts(PROMPT_LENS)[2], reference[2]
    texts = [tokenizer.decode(expected[: i + 1]) for i in range(len(expected))]
    # A stop string that first appears in the text of the first 8 tokens.
    stop = next(
        texts[7][i:] for i in range(len(texts[7]) - 1, -1, -1) if texts[7][i:] not in texts[6]
    )
    end = next(i for i, text in enumerate(texts) if stop in text) + 1

    (result,) = generate(make_scheduler(checkpoint, tokenizer), [prompt], greedy(stop=[stop]))
    assert result["ids"] == expected[:end]
    assert result["finish"] == {"type": "stop", "matched": stop}


def test_requests_beyond_the_context_are_aborted_with_a_reason(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint, max_total_tokens=64)
    submit(scheduler, prompts([60])[0], "too-long", greedy(10))
    (result,) = run_all(scheduler).values()
    assert (
        result["finish"]["type"] == "abort"
        and "context length (64 tokens)" in result["finish"]["message"]
    )


# ---------------------------------------------------------------------------- multimodal


class TokenEmbeddingEncoder:
    """A stand-in media encoder: the 'media' are token ids, encoded by the model's own
    embedding table, so a media request must generate exactly what its text twin does. Like
    the real encode stage it writes content-derived pad ids above the vocabulary."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, span: slice) -> None:
        self.embed = model.get_input_embeddings()
        self.vocab_size = vocab_size
        self.span = span

    def start(self, req: Req) -> TokenEmbeddingJob:
        return TokenEmbeddingJob(self, req)

    def encode(self, req: Req) -> None:
        media_ids = torch.tensor(req.mm_inputs, device=self.embed.weight.device)
        req.origin_input_ids[self.span] = [self.vocab_size + t for t in req.mm_inputs]
        req.mm_mask = torch.zeros(len(req.origin_input_ids), dtype=torch.bool)
        req.mm_mask[self.span] = True
        with torch.no_grad():
            req.mm_embeds = self.embed(media_ids)


@dataclass
class TokenEmbeddingJob:
    """``EncodeJob``'s interface: no tower work, all encoding in ``finish``."""

    encoder: TokenEmbeddingEncoder
    req: Req
    done: bool = True

    def encode_next_batch(self) -> None:
        pass

    def encode_rest(self) -> None:
        pass

    def finish(self) -> None:
        self.encoder.encode(self.req)


def test_media_embeddings_replace_token_embeddings_across_chunks(checkpoint: Path) -> None:
    text = prompts([30], seed=5)[0]
    span = slice(5, 25)
    (expected,) = generate(make_scheduler(checkpoint), [text])

    scheduler = make_scheduler(checkpoint, chunked_prefill_size=8)
    scheduler.mm_encoder = TokenEmbeddingEncoder(
        scheduler.runner.model, scheduler.runner.vocab_size, span
    )
    other_media = [(t + 1) % 400 for t in text[span]]
    submit(scheduler, text, "media", mm_inputs=text[span])
    first = run_all(scheduler)["media"]
    submit(scheduler, text, "same-media", mm_inputs=text[span])
    submit(scheduler, text, "other-media", mm_inputs=other_media)
    rest = run_all(scheduler)

    assert first["ids"] == expected["ids"]
    assert rest["same-media"]["ids"] == expected["ids"]
    assert rest["same-media"]["cached"] == len(text) - 1
    assert rest["other-media"]["cached"] == span.start  # same text before the media only
    assert_pool_empty_after_flush(scheduler)


def test_media_for_a_text_only_model_aborts_only_that_request(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint)
    submit(scheduler, prompts([8])[0], "media", mm_inputs=["an image"])
    submit(scheduler, prompts([8])[0], "text")
    results = run_all(scheduler)
    assert results["media"]["finish"]["type"] == "abort"
    assert "does not accept images" in results["media"]["finish"]["message"]
    assert results["text"]["finish"]["type"] == "length"


def test_decode_batches_carry_every_running_request(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint)
    for i, ids in enumerate(prompts([4, 6, 9])):
        submit(scheduler, ids, str(i))
    scheduler.step()  # one extend forward admits all three
    assert len(scheduler.running) == 3
    batch = scheduler._schedule_decode()
    assert batch.mode is ForwardMode.DECODE and [r.rid for r in batch.reqs] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- mixed chunks


def record_batches(scheduler: Scheduler) -> list[ScheduleBatch]:
    """Every batch the scheduler runs from now on, in order."""
    batches: list[ScheduleBatch] = []
    launch = scheduler._launch

    def recording(batch: ScheduleBatch) -> InflightBatch | None:
        batches.append(batch)
        return launch(batch)

    scheduler._launch = recording
    return batches


def is_mixed(batch: ScheduleBatch) -> bool:
    return batch.mode is ForwardMode.EXTEND and 0 < batch.num_decoding < len(batch.reqs)


def test_mixed_batch_appends_decode_tokens_after_the_prompt_chunks() -> None:
    mask = torch.zeros(12, dtype=torch.bool)
    mask[3:9] = True
    media = Req(
        rid="mm",
        origin_input_ids=list(range(100, 112)),
        sampling_params=greedy(),
        mm_embeds=torch.arange(6, dtype=torch.float32).unsqueeze(1),
        mm_mask=mask,
    )
    decoding = Req(
        rid="decoding", origin_input_ids=[1, 2, 3], sampling_params=greedy(), output_ids=[7, 8]
    )
    pool = ReqToTokenPool(2, 32, "cpu")
    media.req_pool_idx, decoding.req_pool_idx = pool.alloc(), pool.alloc()
    media.kv_len, decoding.kv_len = 4, 4  # the chunk [4, 8); the decode of output 8 at 4

    batch = ScheduleBatch.extend([media], [4]).mixed_with_decode([decoding])
    assert batch.prefill_reqs == [media] and batch.num_new_tokens == 5
    forward = batch.to_forward_batch(torch.arange(1, 6), pool, torch.device("cpu"))
    assert forward.mode is ForwardMode.EXTEND
    assert forward.input_ids.tolist() == [104, 105, 106, 107, 8]
    assert forward.positions.tolist() == [4, 5, 6, 7, 4]
    assert forward.extend_prefix_lens_cpu == [4, 4] and forward.extend_seq_lens_cpu == [4, 1]
    assert forward.mm_mask.tolist() == [True] * 4 + [False]
    assert forward.mm_embeds[:, 0].tolist() == [1, 2, 3, 4]
    assert forward.last_token_indices().tolist() == [3, 4]
    assert pool.req_to_token[decoding.req_pool_idx, 4].item() == 5


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill-only"])
def test_running_requests_advance_one_token_per_prompt_chunk_only_when_mixed(
    checkpoint: Path, mixed: bool
) -> None:
    scheduler = make_scheduler(checkpoint, chunked_prefill_size=16, enable_mixed_chunk=mixed)
    for i, ids in enumerate(prompts([3, 4, 5], seed=6)):
        submit(scheduler, ids, f"running-{i}", greedy(100))
    scheduler.step()  # one extend admits all three
    running = list(scheduler.running)
    assert len(running) == 3
    submit(scheduler, prompts([70], seed=7)[0], "long", greedy(4))
    long_req = scheduler.waiting[-1]
    batches = record_batches(scheduler)

    while long_req not in scheduler.running:
        outputs_before = [len(req.output_ids) for req in running]
        kv_before = long_req.kv_len
        scheduler.step()
        batch = batches[-1]
        assert batch.prefill_reqs == [long_req] and batch.num_new_tokens <= 16
        assert [len(req.output_ids) - n for req, n in zip(running, outputs_before)] == [
            int(mixed)
        ] * len(running)
        assert batch.reqs[1:] == (running if mixed else [])
        assert long_req.kv_len - kv_before == min(16 - mixed * len(running), 70 - kv_before)
    assert len(batches) == (6 if mixed else 5)  # ceil(70 / 13) and ceil(70 / 16)
    run_all(scheduler)
    assert_pool_empty_after_flush(scheduler)


ARRIVALS = [0, 0, 3, 5, 9, 10, 14, 20]  # the step each PROMPT_LENS prompt arrives at


def run_staggered(
    scheduler: Scheduler, special: dict[str, SamplingParams], arrivals: list[int] = ARRIVALS
) -> dict[str, dict]:
    """PROMPT_LENS prompts arriving at the steps ``arrivals`` lists; request "1" asks for
    logprobs, even ones stream. Leaves the scheduler idle and its pool empty."""
    results: dict[str, dict] = {}
    pending = list(enumerate(zip(arrivals, prompts(PROMPT_LENS))))
    for step in range(10_000):
        if not pending and not scheduler.has_work:
            break
        while pending and pending[0][1][0] <= step:
            i, (_, ids) = pending.pop(0)
            submit(
                scheduler,
                ids,
                str(i),
                special.get(str(i)),
                stream=i % 2 == 0,
                return_logprob=i == 1,
                top_logprobs_num=2 if i == 1 else 0,
            )
        collect(scheduler.step(), results)
    assert_pool_empty_after_flush(scheduler)
    return results


def assert_same_results(ours: dict[str, dict], theirs: dict[str, dict]) -> None:
    assert ours.keys() == theirs.keys()
    for rid in ours:
        assert ours[rid]["ids"] == theirs[rid]["ids"], rid
        assert ours[rid]["finish"] == theirs[rid]["finish"], rid
        torch.testing.assert_close(ours[rid]["logprobs"], theirs[rid]["logprobs"], atol=1e-5, rtol=0)
        for mine, other in zip(ours[rid]["top_logprobs"], theirs[rid]["top_logprobs"]):
            assert [t for t, _ in mine] == [t for t, _ in other]


def test_mixed_scheduling_matches_prefill_only_scheduling_with_staggered_arrivals(
    checkpoint: Path, tokenizer, reference: list[list[int]]
) -> None:
    """Requests arrive while others decode, with logprobs, seeded sampling and stop
    conditions: mixed batches change when tokens are computed, never which."""
    special = {
        "1": greedy(),
        "3": SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, top_p=0.9, seed=7),
        "4": greedy(stop_token_ids=[reference[4][9]]),
        "6": greedy(stop=["e"]),
    }

    def run(mixed: bool) -> tuple[dict[str, dict], list[ScheduleBatch]]:
        scheduler = make_scheduler(
            checkpoint, tokenizer, chunked_prefill_size=16, enable_mixed_chunk=mixed
        )
        batches = record_batches(scheduler)
        return run_staggered(scheduler, special), batches

    mixed, mixed_batches = run(mixed=True)
    prefill_only, prefill_only_batches = run(mixed=False)
    assert sum(map(is_mixed, mixed_batches)) >= 5
    assert not any(map(is_mixed, prefill_only_batches))
    assert max(batch.num_new_tokens for batch in mixed_batches) <= 16

    assert_same_results(mixed, prefill_only)
    for rid in map(str, range(len(PROMPT_LENS))):
        if rid not in special:
            assert mixed[rid]["ids"] == reference[int(rid)]
    assert mixed["4"]["finish"]["type"] == mixed["6"]["finish"]["type"] == "stop"
    assert len(mixed["1"]["logprobs"]) == len(mixed["1"]["top_logprobs"]) == MAX_NEW_TOKENS


# ---------------------------------------------------------------------------- overlap schedule


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"chunked_prefill_size": 16},
        {"chunked_prefill_size": 16, "enable_mixed_chunk": False},
        {"max_total_tokens": 72, "chunked_prefill_size": 16},
    ],
    ids=["default", "chunked-mixed", "chunked-prefill-only", "retracting"],
)
def test_overlap_schedule_matches_the_synchronous_schedule(
    checkpoint: Path, tokenizer, reference: list[list[int]], config: dict
) -> None:
    """The overlap schedule launches forwards before the previous tokens reach the host; the
    tokens, logprobs and finish reasons must not change, whatever stops a request."""
    eos = reference[5][6]
    special = {
        "0": greedy(max_new_tokens=1),
        "2": SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.9, top_k=20, seed=3),
        "3": greedy(repetition_penalty=1.3, frequency_penalty=0.5),
        "4": greedy(stop_token_ids=[reference[4][9]]),
        "5": SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),  # stops at eos
        "6": greedy(stop=["e"]),
    }

    def run(overlap: bool) -> tuple[dict[str, dict], int]:
        scheduler = make_scheduler(
            checkpoint, tokenizer, [eos], enable_overlap_schedule=overlap, **config
        )
        launch = scheduler._launch
        launches_reading_pending: list[ScheduleBatch] = []

        def recording(batch: ScheduleBatch) -> InflightBatch | None:
            if any(req.num_pending_tokens for req in batch.reqs):
                launches_reading_pending.append(batch)
            return launch(batch)

        scheduler._launch = recording
        if "max_total_tokens" in config:  # all at once, needing far more than the pool holds
            kept = {rid: special[rid] for rid in ("0", "3", "4")}  # early stops would make room
            results = run_staggered(scheduler, kept, [0] * len(PROMPT_LENS))
            assert scheduler.num_retracted_reqs > 0
        else:
            results = run_staggered(scheduler, special)
        return results, len(launches_reading_pending)

    overlapped, num_overlapped = run(overlap=True)
    synchronous, num_synchronous = run(overlap=False)
    assert num_overlapped > 10 and num_synchronous == 0
    assert_same_results(overlapped, synchronous)
    assert overlapped["0"]["ids"] == reference[0][:1]
    if "max_total_tokens" not in config:
        assert overlapped["5"]["finish"] == {"type": "stop", "matched": eos}
    assert overlapped["7"]["ids"] == reference[7]


def test_abort_while_a_token_is_pending_frees_everything(
    checkpoint: Path, reference: list[list[int]]
) -> None:
    scheduler = make_scheduler(checkpoint, enable_overlap_schedule=True)
    doomed, kept = prompts(PROMPT_LENS)[:2]
    submit(scheduler, doomed, "doomed")
    submit(scheduler, kept, "kept")
    results: dict[str, dict] = {}
    for _ in range(4):
        collect(scheduler.step(), results)
    assert scheduler._inflight is not None
    assert all(req.num_pending_tokens for req in scheduler.running)
    scheduler.abort_request("doomed")
    results.update(run_all(scheduler))
    assert results["doomed"]["finish"]["type"] == "abort"
    assert results["kept"]["ids"] == reference[1]
    assert_pool_empty_after_flush(scheduler)


def test_overlap_schedule_is_the_default_on_cuda_only(checkpoint: Path) -> None:
    from cubeserve.scheduler.scheduler import use_overlap_schedule

    auto = ServerArgs(model_path=str(checkpoint))
    assert use_overlap_schedule(auto, torch.device("cuda"))
    assert not use_overlap_schedule(auto, torch.device("cpu"))
    off = ServerArgs(model_path=str(checkpoint), enable_overlap_schedule=False)
    assert not use_overlap_schedule(off, torch.device("cuda"))


def test_a_full_waiting_queue_rejects_with_503(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint, max_queued_requests=1)
    prompt = prompts([6], seed=5)[0]
    submit(scheduler, prompt, "queued", greedy(2))
    submit(scheduler, prompt, "refused", greedy(2))  # the first still waits: no step ran
    results = run_all(scheduler)
    assert results["queued"]["finish"]["type"] == "length"
    assert results["refused"] == {
        "ids": [], "cached": 0, "logprobs": [], "top_logprobs": [],
        "finish": {"type": "abort", "matched": None, "status_code": 503,
                   "message": "the waiting queue is full (1 requests)"},
    }  # fmt: skip


def test_max_new_tokens_is_settled_against_the_context_length(checkpoint: Path) -> None:
    scheduler = make_scheduler(checkpoint, context_length=32)
    prompt = prompts([30], seed=6)[0]
    submit(scheduler, prompt, "rest of the context", greedy(None))
    submit(scheduler, prompt, "too long", greedy(3))
    submit(scheduler, prompt + prompt[:2], "no room", greedy(None))
    results = run_all(scheduler)
    assert len(results["rest of the context"]["ids"]) == 2
    assert results["rest of the context"]["finish"]["type"] == "length"
    for rid, message in [("too long", "exceeds the context length"), ("no room", "no room for output")]:
        finish = results[rid]["finish"]
        assert (finish["type"], finish["status_code"]) == ("abort", 400)
        assert message in finish["message"]


def test_chunked_prefill_size_defaults_by_device(checkpoint: Path) -> None:
    assert make_scheduler(checkpoint).chunked_prefill_size == 2048  # CPU
    assert make_scheduler(checkpoint, chunked_prefill_size=24).chunked_prefill_size == 24
    assert default_chunked_prefill_size(torch.device("cuda")) == 8192

