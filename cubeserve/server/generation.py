"""Running generations for the HTTP layer.

The tokenizer manager yields cumulative chunks per request; this module turns them into typed
per-sequence deltas, records latency metrics, enforces admission, and closes the manager's
iterator whenever its consumer stops early (client disconnect, error, cancellation), which
aborts the engine request so its KV cache slots are freed at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.server.context import ServingContext
from cubeserve.server.errors import APIError, ClientDisconnected
from cubeserve.server.limits import RETRY_AFTER_S

T = TypeVar("T")


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # (token text, logprob), most likely first


@dataclass
class SequenceDelta:
    """What one step of the engine added to one output sequence (one OpenAI choice)."""

    index: int  # choice index: prompt index * n + sample index
    text: str
    output_ids: list[int]  # all output ids so far
    num_new_tokens: int
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # "stop" | "length" | "abort"
    matched_stop: int | str | None
    prompt_index: int
    prompt_tokens: int
    completion_tokens: int  # so far
    cached_tokens: int
    meta_info: dict[str, Any] = field(repr=False)


class _SequenceCursor:
    """Remembers how much of a sequence's cumulative output has been handed out."""

    def __init__(self) -> None:
        self.completion_tokens = 0
        self.logprobs_sent = 0

    def advance(self, chunk: dict[str, Any], index: int, prompt_index: int,
                token_text: Callable[[int], str]) -> SequenceDelta:
        meta = chunk["meta_info"]
        finish = meta.get("finish_reason")
        completion_tokens = meta["completion_tokens"]
        num_new_tokens = completion_tokens - self.completion_tokens
        self.completion_tokens = completion_tokens
        logprobs = _new_logprobs(meta, self.logprobs_sent, token_text)
        self.logprobs_sent += len(logprobs)
        return SequenceDelta(
            index=index,
            text=chunk.get("delta", ""),
            output_ids=chunk.get("output_ids", []),
            num_new_tokens=num_new_tokens,
            logprobs=logprobs,
            finish_reason=finish["type"] if finish else None,
            matched_stop=finish.get("matched") if finish and finish["type"] == "stop" else None,
            prompt_index=prompt_index,
            prompt_tokens=meta["prompt_tokens"],
            completion_tokens=completion_tokens,
            cached_tokens=meta.get("cached_tokens", 0),
            meta_info=meta,
        )


def _new_logprobs(meta: dict[str, Any], start: int, token_text: Callable[[int], str]) -> list[TokenLogprob]:
    """Logprob entries after the first ``start``; entries are SGLang's (logprob, token_id, text)."""
    chosen = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    entries = []
    for i in range(start, len(chosen)):
        logprob, token_id, _ = chosen[i]
        top = tops[i] if i < len(tops) else []
        entries.append(TokenLogprob(
            token=token_text(token_id),
            logprob=logprob,
            top=[(token_text(top_id), top_logprob) for top_logprob, top_id, _ in top],
        ))
    return entries


class _Metered:
    """Latency and token metrics of one engine request (all its ``n`` sequences)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.metrics = ctx.metrics
        self.arrival = time.perf_counter()
        self.last_token_time: dict[int, float] = {}  # per sequence

    def on_delta(self, delta: SequenceDelta) -> None:
        if delta.num_new_tokens <= 0:
            return
        now = time.perf_counter()
        previous = self.last_token_time.get(delta.index)
        if previous is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            # A chunk may carry several tokens; each gets an equal share of the gap.
            gap = (now - previous) / delta.num_new_tokens
            for _ in range(delta.num_new_tokens):
                self.metrics.itl.observe(gap)
        self.last_token_time[delta.index] = now
        self.metrics.generation_tokens.inc(delta.num_new_tokens)

    def on_sequence_finished(self, delta: SequenceDelta) -> None:
        self.metrics.finished_requests.labels(delta.finish_reason).inc()

    def on_request_finished(self, prompt_tokens: int) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.prompt_tokens.inc(prompt_tokens)


def _engine_rejection(meta: dict[str, Any]) -> APIError | None:
    """An abort before any output that carries a message is the engine refusing the request
    (bad media, queue full...): an error for the client rather than an empty answer."""
    finish = meta.get("finish_reason")
    if not finish or finish["type"] != "abort" or meta["completion_tokens"] or not finish.get("message"):
        return None
    status = finish.get("status_code", 400)
    return APIError(status, finish["message"], headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)


async def _stream_one(ctx: ServingContext, obj: GenerateReqInput, prompt_index: int) -> AsyncIterator[SequenceDelta]:
    n = obj.sampling_params.get("n", 1)
    obj.stream = True  # always stream from the engine: per-token timing, early disconnect checks
    chunks = ctx.manager.generate_request(obj)
    cursors: dict[int, _SequenceCursor] = {}
    finished = 0
    metered = _Metered(ctx)
    try:
        async for chunk in chunks:
            rejection = _engine_rejection(chunk["meta_info"])
            if rejection is not None:
                raise rejection
            sample = chunk.get("index", 0)
            cursor = cursors.setdefault(sample, _SequenceCursor())
            delta = cursor.advance(chunk, prompt_index * n + sample, prompt_index, ctx.token_text)
            metered.on_delta(delta)
            if delta.finish_reason is not None:
                finished += 1
                metered.on_sequence_finished(delta)
                if finished == n:
                    metered.on_request_finished(delta.prompt_tokens)
            yield delta
    finally:
        await chunks.aclose()  # the manager aborts unfinished samples, freeing their KV slots


async def generate(
    ctx: ServingContext, objs: list[GenerateReqInput], admit: bool = True
) -> AsyncIterator[SequenceDelta]:
    """Deltas of all sequences of all prompts, interleaved as they are produced.

    Admission happens on the first ``__anext__`` (so a 503 can still become an HTTP status);
    ``admit=False`` skips it (health probes must not be refused under load).
    """
    sequences = sum(obj.sampling_params.get("n", 1) for obj in objs) if admit else 0
    ctx.admission.acquire(sequences)
    try:
        streams = [_stream_one(ctx, obj, i) for i, obj in enumerate(objs)]
        async with aclosing(_merge(streams)) as deltas:
            async for delta in deltas:
                yield delta
    finally:
        ctx.admission.release(sequences)


async def _merge(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[T]:
    """Items of all ``streams`` as they come; closing the merge closes every stream."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for item in stream:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((False, item))
            await queue.put((True, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((True, exc))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            done, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it (and raising ``ClientDisconnected``) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def collect(stream: AsyncIterator[T]) -> list[T]:
    return [item async for item in stream]
