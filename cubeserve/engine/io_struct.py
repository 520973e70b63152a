"""Messages between the frontend (tokenizer manager, HTTP server) and the engine process."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerateReqInput:
    """One generation request as the frontend receives it (SGLang ``/generate`` shape).

    Exactly one of ``text``, ``input_ids`` or ``messages`` is set. ``messages`` are
    OpenAI-style chat messages (content a string or a list of text/image_url/video_url parts);
    the frontend applies the chat template and the multimodal processor to them.
    """

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    rid: str = field(default_factory=new_request_id)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_cubes: bool = False


@dataclass
class TokenizedGenerateReq:
    """What the engine process receives: ids, validated sampling params, media tensors."""

    rid: str
    input_ids: list[int]
    sampling_params: Any  # cubeserve.engine.sampling_params.SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False
    mm_inputs: Any = None  # processed media (cubeserve.multimodal), None for text


@dataclass
class AbortReq:
    rid: str


@dataclass
class TokenOutput:
    """New tokens of one request since its previous output."""

    rid: str
    new_token_ids: list[int]
    finish_reason: dict[str, Any] | None  # {"type": "stop"|"length"|"abort", "matched": ...}
    prompt_tokens: int
    cached_tokens: int
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    mm_meta: dict[str, Any] | None = None  # e.g. cube segments of each video


@dataclass
class BatchTokenOutput:
    outputs: list[TokenOutput]


@dataclass
class GetStatsReq:
    pass


@dataclass
class EngineStats:
    num_running_reqs: int
    num_waiting_reqs: int
    kv_pool_capacity_tokens: int
    kv_pool_used_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    generated_tokens_total: int
    encoder_cache_hits: int = 0
    encoder_cache_queries: int = 0
    num_retracted_reqs: int = 0  # requests sent back to the queue because the KV pool ran out


@dataclass
class FlushCacheReq:
    pass


@dataclass(frozen=True)
class FlushCacheOutput:
    success: bool  # False while requests are in flight: the cache is then left alone


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once it is ready to serve."""

    model_path: str
    dtype: str
    kv_capacity_tokens: int
    context_len: int  # longest prompt + completion a request may have
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_running_requests: int
