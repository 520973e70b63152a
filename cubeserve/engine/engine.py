"""The offline engine (SGLang's ``sgl.Engine`` shape)::

    with Engine(model_path, max_total_tokens=4096) as engine:
        out = engine.generate("Hello", {"max_new_tokens": 16, "temperature": 0})
        print(out["text"], out["meta_info"]["finish_reason"])

The engine process runs the model; this process runs a ``TokenizerManager`` on a private
event loop thread, so the blocking methods work from any thread and ``async_*`` from any loop.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, Self, TypeVar

from transformers import PreTrainedTokenizerBase

from cubeserve.engine.io_struct import EngineStats, GenerateReqInput
from cubeserve.engine.tokenizer_manager import TokenizerManager, num_samples
from cubeserve.server_args import ServerArgs

T = TypeVar("T")
Chunk = dict[str, Any]


class Engine:
    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        """``server_args``: any ``ServerArgs`` field (``max_total_tokens=...``); ``model_path``
        None runs the built-in demo model."""
        self.server_args = ServerArgs.from_kwargs(model_path=model_path, **server_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cubeserve-frontend", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self.tokenizer_manager = self._call(self._create_manager())
        except BaseException:
            self._stop_loop()
            raise
        atexit.register(self.shutdown)

    @classmethod
    def from_server_args(cls, server_args: ServerArgs) -> Engine:
        return cls(**dataclasses.asdict(server_args))

    async def _create_manager(self) -> TokenizerManager:
        manager = TokenizerManager(self.server_args)
        await manager.start()
        return manager

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer_manager.tokenizer

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[Chunk]:
        """One request, or a batch when ``prompt`` / ``input_ids`` / ``messages`` is a list of
        them (``sampling_params`` then one dict for all or one per request).

        Returns per request (per sample when ``n`` > 1) ``{"text", "output_ids", "meta_info"}``:
        a dict for a single request with ``n`` == 1, else a list. With ``stream`` an iterator
        of chunks (``TokenizerManager.generate_request``'s, ``index`` counting samples across
        the batch).

        Invalid requests (bad sampling params, undecodable media, a prompt too long...): a
        single request raises ``ValueError`` (``MediaError`` for media). In a list, each
        invalid request instead gets its results (one per sample, at its place in the list)
        with empty output and ``meta_info["finish_reason"]`` ``{"type": "abort", "message":
        ..., "status_code": 400}``, and the others run: this is how the engine reports a
        request it rejects (e.g. media too long for the context once encoded), so check each
        result's finish reason. Errors that are not the request's fault (the engine died)
        still raise.
        """
        objs, single = _make_requests(
            prompt, input_ids, messages, sampling_params, stream, return_logprob, top_logprobs_num
        )
        if stream:
            return self._iterate(_stream_all(self.tokenizer_manager, objs, not single))
        results = self._call(_collect_all(self.tokenizer_manager, objs, not single))
        return results[0] if single and len(results) == 1 else results

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[Chunk]:
        """``generate`` for asyncio code; with ``stream``, ``await`` it for an async iterator."""
        objs, single = _make_requests(
            prompt, input_ids, messages, sampling_params, stream, return_logprob, top_logprobs_num
        )
        if stream:
            return self._aiterate(_stream_all(self.tokenizer_manager, objs, not single))
        results = await self._bridge(_collect_all(self.tokenizer_manager, objs, not single))
        return results[0] if single and len(results) == 1 else results

    # ------------------------------------------------------------------ control

    def get_stats(self) -> EngineStats:
        return self._call(self.tokenizer_manager.get_stats())

    def flush_cache(self) -> bool:
        """Empty the prefix cache; False (and no effect) while requests are in flight."""
        return self._call(self.tokenizer_manager.flush_cache())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self._call(self.tokenizer_manager.shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ loop bridging

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _bridge(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _iterate(self, chunks: AsyncIterator[Chunk]) -> Iterator[Chunk]:
        try:
            while True:
                try:
                    yield self._call(_anext(chunks))
                except StopAsyncIteration:
                    return
        finally:  # closing early aborts the requests
            if not self._closed:
                self._call(chunks.aclose())

    async def _aiterate(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        try:
            while True:
                try:
                    yield await self._bridge(_anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                await self._bridge(chunks.aclose())

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


def _make_requests(
    prompt: Any,
    input_ids: Any,
    messages: Any,
    sampling_params: Any,
    stream: bool,
    return_logprob: bool,
    top_logprobs_num: int,
) -> tuple[list[GenerateReqInput], bool]:
    """One ``GenerateReqInput`` per request, and whether a single request was given."""
    prompts = _as_batch(prompt, is_single=lambda p: isinstance(p, str))
    id_lists = _as_batch(input_ids, is_single=lambda ids: not ids or isinstance(ids[0], int))
    conversations = _as_batch(messages, is_single=lambda m: not m or isinstance(m[0], dict))
    given = [batch for batch in (prompts, id_lists, conversations) if batch is not None]
    if len(given) != 1:
        raise ValueError("exactly one of prompt, input_ids or messages must be given")
    items, single = given[0]
    if isinstance(sampling_params, list):
        if len(sampling_params) != len(items):
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {len(items)} requests"
            )
        params_list = sampling_params
    else:
        params_list = [sampling_params or {}] * len(items)
    field = "text" if prompts is not None else "input_ids" if id_lists is not None else "messages"
    objs = [
        GenerateReqInput(
            **{field: item},
            sampling_params=dict(params) if isinstance(params, dict) else params,
            stream=stream,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
        )
        for item, params in zip(items, params_list)
    ]
    return objs, single


def _as_batch(value: Any, is_single: Any) -> tuple[list[Any], bool] | None:
    if value is None:
        return None
    return ([value], True) if is_single(value) else (list(value), False)


async def _collect_all(
    manager: TokenizerManager, objs: list[GenerateReqInput], abort_invalid: bool
) -> list[dict[str, Any]]:
    """Final result of every sample of every request, in request then sample order."""
    finals: dict[int, Chunk] = {}
    async for chunk in _stream_all(manager, objs, abort_invalid):
        if chunk["meta_info"]["finish_reason"] is not None:
            finals[chunk["index"]] = chunk
    return [
        {"text": c["text"], "output_ids": c["output_ids"], "meta_info": c["meta_info"]}
        for _, c in sorted(finals.items())
    ]


async def _stream_all(
    manager: TokenizerManager, objs: list[GenerateReqInput], abort_invalid: bool
) -> AsyncIterator[Chunk]:
    """Chunks of all requests, interleaved as produced; ``index`` counts samples across them.
    ``abort_invalid``: an invalid request finishes as aborted instead of raising."""
    offsets, total = [], 0
    for obj in objs:
        offsets.append(total)
        total += num_samples(obj)
    queue: asyncio.Queue[tuple[Chunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(obj: GenerateReqInput, offset: int) -> None:
        try:
            async for chunk in manager.generate_request(obj, abort_invalid=abort_invalid):
                await queue.put(({**chunk, "index": offset + chunk["index"]}, None))
        except Exception as err:  # re-raised by the consumer; the other requests get aborted
            await queue.put((None, err))
        else:
            await queue.put((None, None))

    tasks = [asyncio.create_task(pump(obj, offset)) for obj, offset in zip(objs, offsets)]
    try:
        for _ in range(len(tasks)):
            while True:
                chunk, error = await queue.get()
                if error is not None:
                    raise error
                if chunk is None:
                    break
                yield chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
