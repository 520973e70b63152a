"""POST /generate: SGLang's native API (text or input_ids plus a ``sampling_params`` dict).

The response is ``{"text", "output_ids", "meta_info"}``, or a list of them (with ``index``) for
a batch or ``n > 1``; streamed events carry the cumulative text so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.server.context import ServingContext
from cubeserve.server.errors import bad_request
from cubeserve.server.generation import SequenceDelta
from cubeserve.server.protocol import GenerateRequest
from cubeserve.server.serving_common import (
    SSE_DONE,
    check_max_tokens,
    event_stream,
    join_deltas,
    open_stream,
    run_to_completion,
    sse_event,
)


def to_generate_inputs(body: GenerateRequest) -> list[GenerateReqInput]:
    if body.rid is not None and body.is_batch:
        raise bad_request("rid can only be given for a single prompt", "rid")

    def one(prompt: str | list[int]) -> GenerateReqInput:
        text, input_ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        obj = GenerateReqInput(
            text=text,
            input_ids=input_ids,
            sampling_params=dict(body.sampling_params),
            return_logprob=body.return_logprob,
            top_logprobs_num=body.top_logprobs_num,
        )
        if body.rid is not None:
            obj.rid = body.rid
        return obj

    return [one(prompt) for prompt in body.prompts()]


def _output(text: str, delta_or_result: Any, with_index: bool) -> dict[str, Any]:
    output = {"text": text, "output_ids": delta_or_result.output_ids, "meta_info": delta_or_result.meta_info}
    if with_index:
        output["index"] = delta_or_result.index
    return output


async def generate_native(ctx: ServingContext, body: GenerateRequest, request: Request) -> Response:
    max_new_tokens = body.sampling_params.get("max_new_tokens")
    if isinstance(max_new_tokens, int):
        check_max_tokens(ctx, max_new_tokens, "sampling_params.max_new_tokens")
    objs = to_generate_inputs(body)
    is_list = body.is_batch or body.sampling_params.get("n", 1) > 1
    if body.stream:
        deltas = await open_stream(ctx, request, objs)
        return event_stream(deltas, partial(_events, is_list))

    results = join_deltas(await run_to_completion(ctx, request, objs))
    outputs = [_output(result.text, result, is_list) for result in results]
    return JSONResponse(outputs if is_list else outputs[0])


async def _events(with_index: bool, deltas: AsyncIterator[SequenceDelta]) -> AsyncIterator[str]:
    texts: dict[int, str] = {}
    async for delta in deltas:
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        yield sse_event(_output(texts[delta.index], delta, with_index))
    yield SSE_DONE
