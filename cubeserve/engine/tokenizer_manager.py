"""The asyncio frontend of the engine, shared by the offline ``Engine`` and the HTTP server.

Usage (inside one event loop)::

    manager = TokenizerManager(server_args)
    await manager.start()                       # spawns the engine process, waits until ready
    async for chunk in manager.generate_request(GenerateReqInput(text="Hi", stream=True)):
        print(chunk["delta"], end="")
    await manager.shutdown()

``generate_request`` yields, for each of the request's ``n`` samples (``chunk["index"]``),
cumulative chunks::

    {"text": str, "delta": str, "output_ids": list[int], "index": int,
     "meta_info": {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                   "finish_reason": None | {"type": "stop"|"length"|"abort", "matched", ...},
                   "output_token_logprobs": [(logprob, token_id, None), ...],     # return_logprob
                   "output_top_logprobs": [[(logprob, token_id, None), ...], ...], # top_logprobs_num
                   "mm_meta": {...}}}                                              # media requests

every few tokens when ``obj.stream``, else only the final chunk of each sample. Invalid
requests raise ``ValueError`` naming the field before anything reaches the engine; with
``abort_invalid`` they yield instead each sample's final chunk with an empty output and finish
reason ``{"type": "abort", "message": ..., "status_code": 400}``, the form in which the engine
reports a request it rejects. Text never contains a stop string or any part of one that may
still complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import zmq
import zmq.asyncio
from transformers import PreTrainedTokenizerBase

from cubeserve.engine.chat_template import apply_chat_template
from cubeserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from cubeserve.engine.io_struct import (
    AbortReq,
    BatchTokenOutput,
    EngineInfo,
    EngineStats,
    FlushCacheOutput,
    FlushCacheReq,
    GenerateReqInput,
    GetStatsReq,
    TokenizedGenerateReq,
    TokenOutput,
)
from cubeserve.engine.ipc import EngineAddresses, EngineProcess, bind
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.engine.tokenizer import load_tokenizer
from cubeserve.multimodal.processors import MessagesProcessor, create_messages_processor
from cubeserve.multimodal.transport import MEDIA_NOT_CACHED, MediaSender
from cubeserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Prompt tokens kept as context for detokenizing the first output tokens.
DETOKENIZE_CONTEXT_TOKENS = 5
ENGINE_WATCH_INTERVAL_MS = 1000


class EngineDeadError(RuntimeError):
    """The engine process exited: requests in flight fail with it, new ones are refused."""


@dataclass
class _SampleState:
    """Frontend-side progress of one sample (sub-request) of a request."""

    rid: str
    index: int
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    want_logprobs: bool
    want_top_logprobs: bool
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    cached_tokens: int = 0
    finish_reason: dict[str, Any] | None = None
    logprobs: list[tuple[float, int, None]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int, None]]] = field(default_factory=list)
    mm_meta: dict[str, Any] | None = None

    def update(self, out: TokenOutput) -> str:
        """Apply one engine output; returns the new visible text."""
        self.output_ids += out.new_token_ids
        self.prompt_tokens = out.prompt_tokens  # counts the expanded media tokens
        self.cached_tokens = out.cached_tokens
        self.finish_reason = out.finish_reason
        if out.mm_meta is not None:
            self.mm_meta = out.mm_meta
        if out.new_logprobs is not None:
            self.logprobs += [(lp, t, None) for lp, t in zip(out.new_logprobs, out.new_token_ids)]
        if out.new_top_logprobs is not None:
            self.top_logprobs += [[(lp, t, None) for t, lp in top] for top in out.new_top_logprobs]
        delta = self.detokenizer.step(out.new_token_ids)
        if out.finish_reason is not None:
            delta += self.detokenizer.flush()
        if self.stop_matcher is not None:
            delta, _ = self.stop_matcher.feed(delta)
            if out.finish_reason is not None and self.stop_matcher.matched is None:
                delta += self.stop_matcher.flush()
        self.text += delta
        return delta

    def chunk(self, delta: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
        }
        if self.want_logprobs:
            meta["output_token_logprobs"] = list(self.logprobs)
        if self.want_top_logprobs:
            meta["output_top_logprobs"] = list(self.top_logprobs)
        if self.mm_meta is not None:
            meta["mm_meta"] = self.mm_meta
        return {
            "text": self.text,
            "delta": delta,
            "output_ids": list(self.output_ids),
            "meta_info": meta,
            "index": self.index,
        }


class TokenizerManager:
    def __init__(
        self, server_args: ServerArgs, messages_processor: MessagesProcessor | None = None
    ) -> None:
        """``messages_processor`` turns chat messages into ``(input_ids, mm_inputs)``; by
        default the model's multimodal processor, if it has one (else text-only chat)."""
        if server_args.model_path is None:
            from cubeserve.demo import ensure_demo_model

            server_args = dataclasses.replace(server_args, model_path=ensure_demo_model())
        self.server_args = server_args
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(
            server_args.tokenizer_path or server_args.model_path
        )
        self.messages_processor = messages_processor or create_messages_processor(
            server_args, self.tokenizer
        )
        self.info: EngineInfo | None = None  # set by ``start``
        self._engine: EngineProcess | None = None
        self._addresses: EngineAddresses | None = None
        self._context: zmq.asyncio.Context | None = None
        self._send_socket: zmq.asyncio.Socket | None = None
        self._recv_socket: zmq.asyncio.Socket | None = None
        self._recv_task: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue[TokenOutput | BaseException]] = {}
        self._sample_rids: dict[str, list[str]] = {}  # request rid -> its samples' rids
        # The engine keeps no encodings to refer to when its encoder cache is off.
        self._media = MediaSender(by_reference=server_args.mm_encoder_cache_mb > 0)
        self._resends: set[asyncio.Task] = set()
        self._stats_waiters: deque[asyncio.Future[EngineStats]] = deque()
        self._flush_waiters: deque[asyncio.Future[bool]] = deque()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Spawn the engine process and wait until it serves (its startup errors re-raise)."""
        self._addresses = EngineAddresses.create()
        self._context = zmq.asyncio.Context()
        self._send_socket = bind(self._context, zmq.PUSH, self._addresses.to_engine)
        self._recv_socket = bind(self._context, zmq.PULL, self._addresses.from_engine)
        try:
            self._engine = await asyncio.to_thread(EngineProcess, self.server_args, self._addresses)
        except BaseException:
            self._close_sockets()
            raise
        self.info = self._engine.info
        self._recv_task = asyncio.create_task(self._recv_loop())

    async def shutdown(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)
            self._recv_task = None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown)
            self._engine = None
        self._fail_pending(EngineDeadError("the engine was shut down"))
        self._close_sockets()
        self._media.close()

    @property
    def engine_pid(self) -> int:
        self._require_started()
        return self._engine.pid

    def _close_sockets(self) -> None:
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        if self._addresses is not None:
            self._addresses.cleanup()

    # ------------------------------------------------------------------ requests

    async def generate_request(
        self, obj: GenerateReqInput, abort_invalid: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Chunks of the request's samples as they are produced (see the module docstring).
        An invalid request raises ``ValueError``, or with ``abort_invalid`` finishes at once
        as aborted (``rejection_chunks``)."""
        try:
            if obj.messages is not None:  # media decoding must not block the event loop
                reqs = await asyncio.to_thread(self.tokenize_request, obj)
            else:
                reqs = self.tokenize_request(obj)
            if obj.rid in self._sample_rids or any(req.rid in self._queues for req in reqs):
                raise ValueError(f"rid {obj.rid!r} is already in use by a running request")
        except ValueError as err:
            if not abort_invalid:
                raise
            for chunk in rejection_chunks(obj, err):
                yield chunk
            return
        self._check_engine_alive()
        queue: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        states = {req.rid: self._new_state(req, i) for i, req in enumerate(reqs)}
        self._sample_rids[obj.rid] = list(states)
        for req in reqs:
            self._queues[req.rid] = queue
        unfinished = len(states)
        try:
            await self._send_generate(reqs)
            while unfinished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                state = states[out.rid]
                delta = state.update(out)
                if out.finish_reason is not None:
                    unfinished -= 1
                if obj.stream or out.finish_reason is not None:
                    yield state.chunk(delta)
        finally:  # the consumer may stop early: abort what is still running
            for rid, state in states.items():
                if self._queues.pop(rid, None) is not None and state.finish_reason is None:
                    self._send(AbortReq(rid))
                self._media.release(rid)
            self._sample_rids.pop(obj.rid, None)

    def abort_request(self, rid: str) -> None:
        """Stop request ``rid`` (all its samples) wherever it is; its consumer gets a final
        chunk with finish reason ``abort``."""
        for sample_rid in self._sample_rids.get(rid, [rid]):
            if sample_rid in self._queues:
                self._send(AbortReq(sample_rid))

    async def get_stats(self) -> EngineStats:
        return await self._control(GetStatsReq(), self._stats_waiters)

    async def flush_cache(self) -> bool:
        """Empty the prefix cache; False when refused because requests are in flight."""
        return await self._control(FlushCacheReq(), self._flush_waiters)

    # ------------------------------------------------------------------ tokenization

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return apply_chat_template(self.tokenizer, messages, self.server_args.chat_template)

    def process_messages(self, messages: list[dict[str, Any]]) -> tuple[list[int], Any]:
        """Chat messages -> ``(input_ids, mm_inputs)``; override or pass ``messages_processor``
        for media."""
        if self.messages_processor is not None:
            return self.messages_processor(messages)
        if any(_has_media(message) for message in messages):
            raise ValueError("messages: this model accepts text content only")
        # The template writes any BOS itself.
        return self.tokenizer.encode(
            self.apply_chat_template(messages), add_special_tokens=False
        ), None

    def tokenize_request(self, obj: GenerateReqInput) -> list[TokenizedGenerateReq]:
        """Validate ``obj`` and make one engine request per sample; raises ``ValueError``."""
        info = self._require_started()
        if not isinstance(obj.sampling_params, dict):
            kind = type(obj.sampling_params).__name__
            raise ValueError(f"sampling_params must be a dict, got {kind}")  # noqa: TRY004
        params = SamplingParams.from_dict(dict(obj.sampling_params)).normalize()
        params.verify(info.vocab_size)
        input_ids, mm_inputs = self._prompt_ids(obj)
        if not input_ids:
            raise ValueError("the prompt is empty: text, input_ids or messages gave no tokens")
        if mm_inputs is None:
            _check_token_ids(input_ids, info.vocab_size)
        # A media placeholder counts as one token here; the engine checks again once expanded.
        params.max_new_tokens_within(len(input_ids), info.context_len)
        if not 0 <= obj.top_logprobs_num <= info.vocab_size:
            raise ValueError(
                f"top_logprobs_num must be in [0, {info.vocab_size}], got {obj.top_logprobs_num}"
            )
        return [
            TokenizedGenerateReq(
                rid=obj.rid if params.n == 1 else f"{obj.rid}-{i}",
                input_ids=input_ids,
                sampling_params=_sample_params(params, i),
                return_logprob=obj.return_logprob,
                top_logprobs_num=obj.top_logprobs_num,
                stream=obj.stream,
                mm_inputs=mm_inputs,
            )
            for i in range(params.n)
        ]

    def _prompt_ids(self, obj: GenerateReqInput) -> tuple[list[int], Any]:
        given = [
            name for name in ("text", "input_ids", "messages") if getattr(obj, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(f"exactly one of text, input_ids or messages must be set, got {given}")
        if obj.messages is not None:
            if not isinstance(obj.messages, list):
                raise ValueError("messages must be a list of {role, content} objects")
            return self.process_messages(obj.messages)
        if obj.text is not None:
            if not isinstance(obj.text, str):
                raise ValueError(f"text must be a string, got {type(obj.text).__name__}")
            return self.tokenize(obj.text), None
        return list(obj.input_ids), None

    # ------------------------------------------------------------------ engine traffic

    def _new_state(self, req: TokenizedGenerateReq, index: int) -> _SampleState:
        params: SamplingParams = req.sampling_params
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids_tail=[t for t in req.input_ids[-DETOKENIZE_CONTEXT_TOKENS:] if t >= 0],
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        return _SampleState(
            rid=req.rid,
            index=index,
            prompt_tokens=len(req.input_ids),
            detokenizer=detokenizer,
            stop_matcher=StopStringMatcher(params.stop) if params.stop else None,
            want_logprobs=req.return_logprob,
            want_top_logprobs=req.top_logprobs_num > 0,
        )

    def _send(self, message: Any) -> None:
        self._require_started()
        self._send_socket.send_pyobj(message)

    async def _send_generate(self, reqs: list[TokenizedGenerateReq]) -> None:
        """Send ``reqs`` with their media by file or by reference (``MediaSender``); pixel
        files are written off the event loop."""
        for req in reqs:
            if req.mm_inputs is None:
                self._send(req)
            else:
                self._send_media(await self._media_wire_form(self._media.wire_form, req))

    async def _resend_with_media(self, out: TokenOutput) -> None:
        """The engine no longer holds the encodings ``out.rid`` referenced: send its pixels.
        A request that referenced nothing (its pixel file was gone) is not resent: ``out``
        finishes it, so a miss can never loop."""
        queue = self._queues.get(out.rid)
        try:
            wire = await self._media_wire_form(self._media.resend_form, out.rid)
        except Exception as err:  # e.g. no room for the pixel file: fail the request
            logger.exception("resending the media of request %s failed", out.rid)
            if queue is not None and self._queues.get(out.rid) is queue:
                queue.put_nowait(err)
            return
        if wire is None:
            if queue is not None and self._queues.get(out.rid) is queue:
                queue.put_nowait(out)
        elif out.rid in self._queues:
            self._send_media(wire)
        else:  # its consumer is gone
            self._media.abandon(wire)

    async def _media_wire_form(
        self, make: Callable[[Any], TokenizedGenerateReq | None], arg: Any
    ) -> TokenizedGenerateReq | None:
        """``make(arg)`` in a worker thread (it writes pixel files). If the caller is cancelled
        meanwhile, the request it makes is abandoned once made, so that nothing waits for it to
        be sent (``MediaSender``'s protocol)."""
        task = asyncio.ensure_future(asyncio.to_thread(make, arg))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abandon_made)
            raise

    def _abandon_made(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            self._media.abandon(task.result())

    def _send_media(self, wire: TokenizedGenerateReq) -> None:
        try:
            self._send(wire)
        except BaseException:
            self._media.abandon(wire)
            raise
        self._media.sent(wire)

    async def _control(self, request: Any, waiters: deque[asyncio.Future]) -> Any:
        self._check_engine_alive()
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        self._send(request)
        return await future

    async def _recv_loop(self) -> None:
        while True:
            if await self._recv_socket.poll(ENGINE_WATCH_INTERVAL_MS):
                self._dispatch(await self._recv_socket.recv_pyobj())
            elif not self._engine.is_alive():
                error = self._engine_dead_error()
                logger.error("%s", error)
                self._fail_pending(error)
                return

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, BatchTokenOutput):
            for out in message.outputs:
                if out.finish_reason is not None and out.finish_reason.get(MEDIA_NOT_CACHED):
                    task = asyncio.create_task(self._resend_with_media(out))
                    self._resends.add(task)
                    task.add_done_callback(self._resends.discard)
                    continue
                queue = self._queues.get(out.rid)
                if queue is not None:  # else its consumer is gone
                    queue.put_nowait(out)
        elif isinstance(message, EngineStats):
            _resolve_oldest(self._stats_waiters, message)
        elif isinstance(message, FlushCacheOutput):
            _resolve_oldest(self._flush_waiters, message.success)
        else:
            logger.error("unexpected message from the engine: %r", message)

    def _check_engine_alive(self) -> None:
        """Refuse a request nobody would answer. (Requests in flight are failed by the receive
        loop, after it has read what the engine sent before it died.)"""
        self._require_started()
        if not self._engine.is_alive():
            raise self._engine_dead_error()

    def _engine_dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine process died (exit code {self._engine.exitcode})")

    def _fail_pending(self, error: BaseException) -> None:
        for queue in {id(queue): queue for queue in self._queues.values()}.values():
            queue.put_nowait(error)
        self._queues.clear()  # nothing is left to abort in the engine
        for waiters in (self._stats_waiters, self._flush_waiters):
            while waiters:
                future = waiters.popleft()
                if not future.done():  # its caller may have given up (cancelled) already
                    future.set_exception(error)

    def _require_started(self) -> EngineInfo:
        if self.info is None or self._engine is None:
            raise RuntimeError(
                "TokenizerManager.start() has not been awaited (or it was shut down)"
            )
        return self.info


def _resolve_oldest(waiters: deque[asyncio.Future], result: Any) -> None:
    """Replies come in request order: this one belongs to the oldest waiter, which is skipped
    (the reply dropped) when its caller stopped waiting."""
    future = waiters.popleft()
    if not future.done():
        future.set_result(result)


def num_samples(obj: GenerateReqInput) -> int:
    """How many samples (results) ``obj`` makes: its ``n``; 1 when ``n`` is invalid."""
    n = obj.sampling_params.get("n", 1) if isinstance(obj.sampling_params, dict) else 1
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def rejection_chunks(obj: GenerateReqInput, error: Exception) -> list[dict[str, Any]]:
    """The final chunk of each sample of ``obj``, refused by the frontend with ``error``: empty
    output, finish reason abort with the message and status 400, like a request the engine
    rejects (``cubeserve.scheduler.request.FinishReason.rejected``)."""
    n = num_samples(obj)
    chunks = []
    for index in range(n):
        meta: dict[str, Any] = {
            "id": obj.rid if n == 1 else f"{obj.rid}-{index}",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "finish_reason": {
                "type": "abort",
                "matched": None,
                "message": str(error),
                "status_code": int(HTTPStatus.BAD_REQUEST),
            },
        }
        if obj.return_logprob:
            meta["output_token_logprobs"] = []
        if obj.top_logprobs_num:
            meta["output_top_logprobs"] = []
        chunks.append(
            {"text": "", "delta": "", "output_ids": [], "meta_info": meta, "index": index}
        )
    return chunks


def _sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample ``index`` of an ``n``-sample request: its own copy, seeded apart from the others."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


def _check_token_ids(input_ids: list[Any], vocab_size: int) -> None:
    for token_id in input_ids:
        if (
            isinstance(token_id, bool)
            or not isinstance(token_id, int)
            or not 0 <= token_id < vocab_size
        ):
            raise ValueError(f"input_ids has {token_id!r}, not a token id in [0, {vocab_size})")


def _has_media(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") not in ("text", None) for part in content
    )
