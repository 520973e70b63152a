"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.server.context import ServingContext
from cubeserve.server.generation import SequenceDelta, TokenLogprob
from cubeserve.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
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


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.token.encode()),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in entry.top],
        )
        for entry in entries
    ])


def to_generate_input(body: ChatCompletionRequest) -> GenerateReqInput:
    return GenerateReqInput(
        messages=[message.model_dump(exclude_none=True) for message in body.messages],
        sampling_params=body.sampling_params(),
        return_logprob=body.logprobs,
        top_logprobs_num=body.top_logprobs or 0,
        return_cubes=body.return_cubes,
    )


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    check_model(ctx, body.model)
    check_max_tokens(ctx, body.max_new_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    obj = to_generate_input(body)
    response_id, created = f"chatcmpl-{obj.rid}", int(time.time())
    if body.stream:
        deltas = await open_stream(ctx, request, [obj])
        return event_stream(deltas, partial(_chunks, ctx, body, response_id, created))

    deltas = await run_to_completion(ctx, request, [obj])
    choices = [
        ChatCompletionChoice(
            index=result.index,
            message=AssistantMessage(content=result.text),
            logprobs=chat_logprobs(result.logprobs) if body.logprobs else None,
            finish_reason=result.finish_reason,
            matched_stop=result.matched_stop,
        )
        for result in join_deltas(deltas)
    ]
    response = ChatCompletionResponse(
        id=response_id, created=created, model=ctx.model.name, choices=choices, usage=usage_of(deltas),
        cubes=_first_cubes(body, deltas),
    )
    return JSONResponse(response.model_dump(exclude_none=True))


def _cubes(delta: SequenceDelta) -> list | None:
    """Quicksviewer's cube segmentation of each video in the prompt (reported by the engine)."""
    return (delta.meta_info.get("mm_meta") or {}).get("cubes")


def _first_cubes(body: ChatCompletionRequest, deltas: list[SequenceDelta]) -> list | None:
    if not body.return_cubes:
        return None
    return next((cubes for cubes in map(_cubes, deltas) if cubes is not None), None)


async def _chunks(
    ctx: ServingContext, body: ChatCompletionRequest, response_id: str, created: int,
    deltas: AsyncIterator[SequenceDelta],
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionChunkChoice], **extra: object) -> str:
        return sse_event(ChatCompletionChunk(
            id=response_id, created=created, model=ctx.model.name, choices=choices, **extra,
        ))

    for index in range(body.n):
        yield chunk([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    usage = UsageTracker()
    cubes_sent = not body.return_cubes
    async for delta in deltas:
        usage.add(delta)
        cubes = None if cubes_sent else _cubes(delta)
        cubes_sent = cubes_sent or cubes is not None
        if not (delta.text or delta.logprobs or delta.finish_reason or cubes is not None):
            continue
        choice = ChatCompletionChunkChoice(
            index=delta.index,
            delta=DeltaMessage(content=delta.text),
            logprobs=chat_logprobs(delta.logprobs) if body.logprobs else None,
            finish_reason=delta.finish_reason,
            matched_stop=delta.matched_stop,
        )
        yield chunk([choice], cubes=cubes)
    if body.include_usage_in_stream:
        yield chunk([], usage=usage.usage())
    yield SSE_DONE
