"""What the chat, completions and native ``/generate`` handlers share: request checks, running a
generation to completion or as a server-sent-event stream, usage accounting."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.engine.tokenizer_manager import EngineDeadError
from cubeserve.multimodal.media import MediaError
from cubeserve.server.context import ServingContext
from cubeserve.server.errors import APIError, bad_request, error_body
from cubeserve.server.generation import SequenceDelta, TokenLogprob, cancel_on_disconnect, collect, generate
from cubeserve.server.protocol import PromptTokensDetails, UsageInfo

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def check_model(ctx: ServingContext, name: str) -> None:
    if name not in (ctx.model.name, ctx.model.path):
        raise APIError(404, f"the model {name!r} does not exist; this server serves {ctx.model.name!r}",
                       param="model", code="model_not_found")


def check_max_tokens(ctx: ServingContext, max_new_tokens: int | None, param: str) -> None:
    if max_new_tokens is not None and max_new_tokens > ctx.model.context_length:
        raise bad_request(
            f"{param} is {max_new_tokens}, more than the model's context length of "
            f"{ctx.model.context_length} tokens", param,
        )


class UsageTracker:
    """Token counts of a (possibly batched, possibly n > 1) request from its deltas."""

    def __init__(self) -> None:
        self._prompt_tokens: dict[int, int] = {}  # per prompt: its n samples share the prompt
        self._cached_tokens: dict[int, int] = {}
        self._completion_tokens: dict[int, int] = {}  # per choice

    def add(self, delta: SequenceDelta) -> None:
        self._prompt_tokens[delta.prompt_index] = delta.prompt_tokens
        self._cached_tokens[delta.prompt_index] = delta.cached_tokens
        self._completion_tokens[delta.index] = delta.completion_tokens

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(self._prompt_tokens.values())
        completion_tokens = sum(self._completion_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens.values())),
        )


@dataclass
class SequenceResult:
    """A finished output sequence: all of its deltas joined."""

    index: int
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "abort"  # stays so only if the engine ended it without a reason
    matched_stop: int | str | None = None
    meta_info: dict[str, Any] = field(default_factory=dict)


def join_deltas(deltas: list[SequenceDelta]) -> list[SequenceResult]:
    results: dict[int, SequenceResult] = {}
    for delta in deltas:
        result = results.setdefault(delta.index, SequenceResult(delta.index))
        result.text += delta.text
        result.output_ids = delta.output_ids
        result.logprobs.extend(delta.logprobs)
        result.meta_info = delta.meta_info
        if delta.finish_reason is not None:
            result.finish_reason, result.matched_stop = delta.finish_reason, delta.matched_stop
    return [results[index] for index in sorted(results)]


def usage_of(deltas: list[SequenceDelta]) -> UsageInfo:
    tracker = UsageTracker()
    for delta in deltas:
        tracker.add(delta)
    return tracker.usage()


def as_api_error(exc: Exception) -> APIError | None:
    """The client-facing form of an error raised by the tokenizer manager, if it has one."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MediaError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, ValueError):  # invalid sampling params, prompt too long...
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    return None


async def run_to_completion(
    ctx: ServingContext, request: Request, objs: list[GenerateReqInput], admit: bool = True
) -> list[SequenceDelta]:
    try:
        return await cancel_on_disconnect(request, collect(generate(ctx, objs, admit)))
    except (ValueError, EngineDeadError) as exc:
        raise as_api_error(exc) from exc


async def open_stream(
    ctx: ServingContext, request: Request, objs: list[GenerateReqInput]
) -> AsyncGenerator[SequenceDelta, None]:
    """The generation's deltas, after waiting for the first one.

    Errors found before the first token (admission, validation) still become an HTTP status;
    only later ones have to be reported inside the stream.
    """
    stream = generate(ctx, objs)
    try:
        first = await cancel_on_disconnect(request, anext(stream))
    except (ValueError, EngineDeadError) as exc:
        raise as_api_error(exc) from exc
    return _prepend(first, stream)


async def _prepend(
    first: SequenceDelta, rest: AsyncGenerator[SequenceDelta, None]
) -> AsyncGenerator[SequenceDelta, None]:
    async with aclosing(rest):
        yield first
        async for item in rest:
            yield item


def event_stream(
    deltas: AsyncGenerator[SequenceDelta, None], render: Callable[[AsyncIterator[SequenceDelta]], AsyncIterator[str]]
) -> StreamingResponse:
    """A server-sent-event response of ``render(deltas)``. However the response ends (done,
    error, client gone), ``deltas`` is closed, which aborts the generation if unfinished."""
    return StreamingResponse(
        _event_body(deltas, render),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_body(
    deltas: AsyncGenerator[SequenceDelta, None], render: Callable[[AsyncIterator[SequenceDelta]], AsyncIterator[str]]
) -> AsyncIterator[str]:
    async with aclosing(deltas):
        try:
            async for event in render(deltas):
                yield event
        except Exception as exc:  # once the 200 is sent an error can only be an event, as in OpenAI's API
            error = as_api_error(exc)
            if error is None:
                logger.exception("error while streaming a response")
                error = APIError(500, f"internal server error: {type(exc).__name__}")
            yield sse_event(error_body(error.status_code, error.message, error.param, error.code))
            yield SSE_DONE
