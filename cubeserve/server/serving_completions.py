"""POST /v1/completions (a list of prompts is a batch: choice index = prompt index * n + sample)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.server.context import ServingContext
from cubeserve.server.generation import SequenceDelta, TokenLogprob
from cubeserve.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from cubeserve.server.serving_common import (
    SSE_DONE,
    UsageTracker,
    check_max_tokens,
    check_model,
    event_stream,
    join_deltas,
    open_stream,
    run_to_completion,
    sse_event,
    usage_of,
)


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> CompletionLogprobs:
    """Legacy logprobs; ``text_offset`` is where the first entry's token starts in the choice text."""
    logprobs = CompletionLogprobs()
    for entry in entries:
        logprobs.tokens.append(entry.token)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append(dict(entry.top))
        logprobs.text_offset.append(text_offset)
        text_offset += len(entry.token)
    return logprobs


def to_generate_inputs(body: CompletionRequest) -> list[GenerateReqInput]:
    def one(prompt: str | list[int]) -> GenerateReqInput:
        text, input_ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        return GenerateReqInput(
            text=text,
            input_ids=input_ids,
            sampling_params=body.sampling_params(),
            return_logprob=body.logprobs is not None,
            top_logprobs_num=body.logprobs or 0,
        )

    return [one(prompt) for prompt in body.prompts()]


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    check_model(ctx, body.model)
    check_max_tokens(ctx, body.max_tokens, "max_tokens")
    objs = to_generate_inputs(body)
    response_id, created = f"cmpl-{objs[0].rid}", int(time.time())
    if body.stream:
        deltas = await open_stream(ctx, request, objs)
        return event_stream(deltas, partial(_chunks, ctx, body, response_id, created))

    deltas = await run_to_completion(ctx, request, objs)
    choices = [
        CompletionChoice(
            index=result.index,
            text=result.text,
            logprobs=completion_logprobs(result.logprobs) if body.logprobs is not None else None,
            finish_reason=result.finish_reason,
            matched_stop=result.matched_stop,
        )
        for result in join_deltas(deltas)
    ]
    response = CompletionResponse(
        id=response_id, created=created, model=ctx.model.name, choices=choices, usage=usage_of(deltas),
    )
    return JSONResponse(response.model_dump(exclude_none=True))


async def _chunks(
    ctx: ServingContext, body: CompletionRequest, response_id: str, created: int,
    deltas: AsyncIterator[SequenceDelta],
) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], **extra: object) -> str:
        return sse_event(CompletionResponse(
            id=response_id, created=created, model=ctx.model.name, choices=choices, **extra,
        ))

    usage = UsageTracker()
    text_offsets: dict[int, int] = {}
    async for delta in deltas:
        usage.add(delta)
        if not (delta.text or delta.logprobs or delta.finish_reason):
            continue
        logprobs = None
        if body.logprobs is not None:
            offset = text_offsets.get(delta.index, 0)
            logprobs = completion_logprobs(delta.logprobs, offset)
            text_offsets[delta.index] = offset + sum(len(entry.token) for entry in delta.logprobs)
        choice = CompletionChoice(
            index=delta.index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            matched_stop=delta.matched_stop,
        )
        yield chunk([choice])
    if body.include_usage_in_stream:
        yield chunk([], usage=usage.usage())
    yield SSE_DONE
