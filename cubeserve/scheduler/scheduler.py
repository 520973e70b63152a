"""The engine's scheduling loop: continuous batching over a paged, prefix-cached KV pool.

Every step runs one forward: an EXTEND batch when waiting (or half-prefilled) requests can be
admitted, else a DECODE batch of all running requests (SGLang's prefill-first policy). With
``--enable-mixed-chunk`` (the default) the running requests also decode inside the EXTEND
batch, as 1-token extends after the prompt chunks (SGLang's mixed chunked prefill), so they
keep streaming while long prompts are prefilled chunk by chunk.

Requests with media queue for the vision encoder first (``encoding``), which works on one
request at a time: all of it in one step when nothing else runs, else one vision-tower batch
per step, so that a long video never stalls the running streams for its whole encoding.

Overlap schedule (on by default on CUDA, SGLang's zero-overhead scheduler): the host
launches a forward, then takes in the tokens sampled by the previous one while the device
runs it, so scheduling and output processing hide behind the GPU. A running request whose
last token is still on the device (``Req.num_pending_tokens``) decodes by reading it there. A
request stopped by that token has computed one token too many (its KV is cached, the token
dropped). Steps that need every token on the host first wait for the previous forward:
sampling with penalties (they count output tokens) and retraction.

KV accounting: a request's row in the ReqToTokenPool lists its slots; the part that came from
the radix cache is locked there, the rest it owns. When it finishes (or is aborted, or
retracted) its KV goes into the radix cache, which frees what it already had and keeps the
rest evictable. Slots are allocated per forward; when decode runs short even after eviction,
the newest running requests are retracted to the waiting queue and recomputed later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import torch
import zmq
from transformers import PreTrainedTokenizerBase

from cubeserve.engine.detokenizer import tail_contains_stop
from cubeserve.engine.io_struct import (
    AbortReq,
    BatchTokenOutput,
    EngineInfo,
    EngineStats,
    FlushCacheOutput,
    FlushCacheReq,
    GetStatsReq,
    TokenizedGenerateReq,
    TokenOutput,
)
from cubeserve.engine.ipc import (
    EngineAddresses,
    connect,
    init_engine_process,
    recv_all,
    report_startup_failure,
)
from cubeserve.engine.model_runner import ModelRunner, load_model_config
from cubeserve.engine.sampler import SampleOutput, make_generator
from cubeserve.engine.tokenizer import get_eos_token_ids, load_tokenizer
from cubeserve.mem_cache.radix_cache import RadixCache
from cubeserve.multimodal.encode_stage import (
    EncodeJob,
    create_encode_stage,
    encoder_cache_bytes,
)
from cubeserve.multimodal.transport import MediaNotCachedError
from cubeserve.scheduler.request import FinishReason, Req
from cubeserve.scheduler.schedule_batch import InflightBatch, ScheduleBatch
from cubeserve.scheduler.schedule_policy import (
    DecodeReservation,
    SchedulePolicy,
    prefix_match_key,
)
from cubeserve.server_args import ServerArgs
from cubeserve.utils import to_device

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        server_args: ServerArgs,
        model_runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """``tokenizer`` is only needed for stop strings; ``eos_token_ids`` end a request
        unless it sets ``ignore_eos``."""
        self.runner = model_runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.allocator = model_runner.token_allocator
        self.tree_cache = RadixCache(self.allocator, disable=server_args.disable_radix_cache)
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache)
        self.reservation = DecodeReservation()
        self.chunked_prefill_size = server_args.chunked_prefill_size or default_chunked_prefill_size(
            model_runner.device
        )
        self.enable_mixed_chunk = server_args.enable_mixed_chunk
        self.overlap = use_overlap_schedule(server_args, model_runner.device)
        self.max_queued_requests = server_args.max_queued_requests
        self.mm_encoder = create_encode_stage(
            model_runner.model,
            encoder_cache_bytes(server_args, model_runner.model),
            server_args.vision_batch_size,
        )

        self.encoding: list[EncodeJob] = []  # requests whose media are being encoded, FCFS
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # fully prefilled, in admission order
        self.chunked_req: Req | None = None  # at most one request is prefilled across steps
        self._inflight: InflightBatch | None = None  # overlap: the forward running on the device
        self.num_generated_tokens = 0
        self.num_retracted_reqs = 0
        self._outbox: dict[str, Req] = {}  # requests with output to send after this step

    # ------------------------------------------------------------------ requests in

    @property
    def has_work(self) -> bool:
        """Whether ``step`` has anything to do: requests to run or outputs to send."""
        return bool(self._live_reqs() or self._outbox or self._inflight)

    def handle_message(self, message: Any) -> Any:
        """Apply one frontend message; returns the reply to send back, if any."""
        if isinstance(message, TokenizedGenerateReq):
            self.add_request(message)
        elif isinstance(message, AbortReq):
            self.abort_request(message.rid)
        elif isinstance(message, GetStatsReq):
            return self.get_stats()
        elif isinstance(message, FlushCacheReq):
            return FlushCacheOutput(self.flush_cache())
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")
        return None

    def add_request(self, recv: TokenizedGenerateReq) -> Req:
        """Queue ``recv``: to the vision encoder first if it has media, else to ``waiting``.
        A request that cannot be served finishes at once as aborted."""
        req = Req(
            rid=recv.rid,
            origin_input_ids=list(recv.input_ids),
            sampling_params=recv.sampling_params,
            generator=make_generator(recv.sampling_params.seed, self.runner.device),
            return_logprob=recv.return_logprob,
            top_logprobs_num=recv.top_logprobs_num,
            stream=recv.stream,
            mm_inputs=recv.mm_inputs,
        )
        rejection = self._arrival_rejection(req)
        if rejection is None and req.mm_inputs is not None:
            rejection = self._media_failure(
                req, lambda: self.encoding.append(self.mm_encoder.start(req))
            )
        elif rejection is None:
            rejection = self._enqueue(req)
        if rejection is not None:
            self._finish(req, rejection)
        return req

    def _arrival_rejection(self, req: Req) -> FinishReason | None:
        if len(self.waiting) + len(self.encoding) >= self.max_queued_requests:
            return FinishReason.rejected(
                f"the waiting queue is full ({self.max_queued_requests} requests)",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        if req.mm_inputs is not None and self.mm_encoder is None:
            return FinishReason.rejected(
                f"{type(self.runner.model).__name__} does not accept images or videos"
            )
        return None

    def _media_failure(self, req: Req, work: Callable[[], object]) -> FinishReason | None:
        """Run ``work`` on ``req``'s media; why it failed, or None. Bad media fail their own
        request, never the engine."""
        try:
            work()
        except MediaNotCachedError as err:
            return FinishReason(
                "abort", message=str(err), status_code=HTTPStatus.CONFLICT, media_not_cached=True
            )
        except Exception as err:
            logger.exception("multimodal encoding failed for request %s", req.rid)
            return FinishReason.rejected(f"multimodal input error: {err}")
        return None

    def _enqueue(self, req: Req) -> FinishReason | None:
        """Settle ``max_new_tokens`` (default: the rest of the context) on the final prompt and
        queue ``req`` for prefill; or say why it cannot run."""
        if not req.origin_input_ids:
            return FinishReason.rejected("the prompt is empty")
        params = req.sampling_params
        try:
            params.max_new_tokens = params.max_new_tokens_within(
                len(req.origin_input_ids), self.runner.context_len
            )
        except ValueError as err:
            return FinishReason.rejected(str(err))
        self.waiting.append(req)
        return None

    def _encode_media(self) -> None:
        """Advance the vision encoding of the first request in ``encoding``: all of it when
        nothing else is in flight, else one vision-tower batch per step, so that running
        requests keep decoding while a long video is encoded (the tower's own batches, so the
        features are the same either way)."""
        if not self.encoding:
            return
        job = self.encoding[0]
        busy = bool(self.running or self.waiting or self.chunked_req)
        failure = self._media_failure(
            job.req, job.encode_next_batch if busy else job.encode_rest
        )
        if failure is None and not job.done:
            return
        self.encoding.pop(0)
        if failure is None:
            failure = self._media_failure(job.req, job.finish) or self._enqueue(job.req)
        if failure is not None:
            self._finish(job.req, failure)

    def abort_request(self, rid: str) -> None:
        req = next((r for r in self._live_reqs() if r.rid == rid), None)
        if req is None:  # already finished
            return
        if req in (job.req for job in self.encoding):
            self.encoding = [job for job in self.encoding if job.req is not req]
        elif req is self.chunked_req:
            self.chunked_req = None
        elif req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release_kv(req)
        self._finish(req, FinishReason("abort", message="aborted by the client"))

    def flush_cache(self) -> bool:
        """Empty the radix cache; refused (False) while any request is in flight."""
        if self._live_reqs() or self._inflight:
            return False
        self.tree_cache.reset()
        return True

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running_reqs=len(self.running) + (self.chunked_req is not None),
            num_waiting_reqs=len(self.waiting) + len(self.encoding),
            kv_pool_capacity_tokens=self.allocator.num_slots,
            kv_pool_used_tokens=self.allocator.used_size(),
            prefix_cache_hit_tokens=self.tree_cache.stats.hit_tokens,
            prefix_cache_query_tokens=self.tree_cache.stats.query_tokens,
            generated_tokens_total=self.num_generated_tokens,
            encoder_cache_hits=self.mm_encoder.cache.hits if self.mm_encoder else 0,
            encoder_cache_queries=self.mm_encoder.cache.queries if self.mm_encoder else 0,
            num_retracted_reqs=self.num_retracted_reqs,
        )

    # ------------------------------------------------------------------ one step

    def step(self) -> list[TokenOutput]:
        """Launch at most one forward, then take in the tokens of the previous one (overlap
        schedule: the device runs this forward meanwhile), else of this one. Returns the
        outputs to send to the frontend."""
        if self._inflight is not None and any(
            req.sampling_params.has_penalties for req in self._inflight.reqs
        ):
            self._process_inflight()  # penalties count every output token
        self._encode_media()
        batch = self._schedule()
        launched = self._launch(batch) if batch is not None else None
        self._process_inflight()
        self._inflight = launched
        if not self.overlap:
            self._process_inflight()
        return self._drain_outputs()

    def _schedule(self) -> ScheduleBatch | None:
        """The next forward: prompt chunks when any can run (prefill-first), carrying one decode
        token of every running request when mixing; else a decode of all running requests.

        Mixing needs room for prompt tokens in the chunk budget; with more running requests
        than that, prompt chunks run alone so that waiting requests still get admitted.
        """
        if not (self.enable_mixed_chunk and 0 < len(self.running) < self.chunked_prefill_size):
            return self._schedule_extend() or self._schedule_decode()
        self._reserve_decode_slots()
        extend = self._schedule_extend(decode_tokens=len(self.running))
        if extend is None:
            return self._schedule_decode()
        self.reservation.on_decode_step()
        return extend.mixed_with_decode(list(self.running))

    def _schedule_extend(self, decode_tokens: int = 0) -> ScheduleBatch | None:
        """``decode_tokens``: running requests decoding in the same forward. Their KV slots are
        already reserved, and they count against the chunk budget, so that no forward computes
        more than ``chunked_prefill_size`` tokens."""
        reqs: list[Req] = []
        lens: list[int] = []
        budget = self.chunked_prefill_size - decode_tokens
        if self.chunked_req is not None:
            req = self.chunked_req
            n = min(req.fill_len - req.kv_len, budget, self._available_tokens() - decode_tokens)
            if n == 0:
                return None
            reqs.append(req)
            lens.append(n)
            budget -= n
            if req.kv_len + n < req.fill_len:
                return ScheduleBatch.extend(reqs, lens)
            self.chunked_req = None

        self.policy.sort_waiting(self.waiting)
        admitted: list[Req] = []
        for req in self.waiting:
            if budget == 0 or self.req_to_token_pool.available_size() == 0:
                break
            n = self._admit(req, budget, batch=reqs, pending_tokens=decode_tokens + sum(lens))
            if n is None:
                break
            admitted.append(req)
            reqs.append(req)
            lens.append(n)
            budget -= n
            if req.kv_len + n < req.fill_len:
                self.chunked_req = req
                break
        self.waiting = [req for req in self.waiting if req not in admitted]
        return ScheduleBatch.extend(reqs, lens) if reqs else None

    def _admit(self, req: Req, budget: int, batch: list[Req], pending_tokens: int) -> int | None:
        """Give ``req`` a row and its cached prefix if memory allows; returns how many of its
        tokens to compute in this forward (the rest is prefilled in later chunks).

        Besides this chunk, the request must leave room for the rest of its prompt and for the
        expected decode tokens of all admitted requests, unless nothing else runs (any
        request fits an otherwise empty pool, by the context check).
        """
        prefix, last_node = self.tree_cache.match_prefix(prefix_match_key(req))
        extend = req.fill_len - len(prefix)
        chunk = min(extend, budget)
        self.tree_cache.inc_lock_ref(last_node)
        free = self._available_tokens() - pending_tokens
        headroom = free - self.reservation.tokens(self.running + batch)
        idle = not (self.running or batch)
        if chunk > free or (extend + self.reservation.tokens_for(req) > headroom and not idle):
            self.tree_cache.dec_lock_ref(last_node)
            return None
        req.req_pool_idx = self.req_to_token_pool.alloc()
        self.req_to_token_pool.write_prefix(req.req_pool_idx, prefix)
        req.prefix_len = req.kv_len = len(prefix)
        req.last_node = last_node
        if req.cached_tokens is None:  # retracted requests are not counted twice
            req.cached_tokens = len(prefix)
            self.tree_cache.stats.record(len(req.origin_input_ids), len(prefix))
        return chunk

    def _schedule_decode(self) -> ScheduleBatch | None:
        if not self.running:
            return None
        self._reserve_decode_slots()
        self.reservation.on_decode_step()
        return ScheduleBatch.decode(list(self.running))

    def _reserve_decode_slots(self) -> None:
        """Retract until every running request has a KV slot for its next token."""
        if self._available_tokens() < len(self.running):
            self._process_inflight()  # finishing requests may free enough; retraction needs
            # every request's tokens on the host
        while self._available_tokens() < len(self.running):
            self._retract_newest()

    def _retract_newest(self) -> None:
        """Send the newest running request back to the waiting queue, freeing its KV; the
        half-prefilled request goes only when a single running request is left."""
        if len(self.running) > 1:
            req = self.running.pop()
        elif self.chunked_req is not None:
            req, self.chunked_req = self.chunked_req, None
        else:  # cannot happen: the context check keeps every request within the pool
            raise RuntimeError("the KV pool cannot hold a single request")
        logger.info("retracting request %s: KV pool exhausted", req.rid)
        self._release_kv(req)
        self.waiting.insert(0, req)
        self.num_retracted_reqs += 1
        self.reservation.on_retract()

    def _launch(self, batch: ScheduleBatch) -> InflightBatch | None:
        """Queue ``batch``'s forward and the sampling of every request whose KV then covers all
        its tokens (a chunked prompt waits); the sampled tokens stay on the device."""
        out_cache_loc = self._alloc_slots(batch.num_new_tokens)
        forward_batch = batch.to_forward_batch(
            out_cache_loc, self.req_to_token_pool, self.runner.device, self._inflight
        )
        logits = self.runner.forward(forward_batch)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
        ready = [i for i, req in enumerate(batch.reqs) if req.kv_len == req.fill_len]
        ready_reqs = [batch.reqs[i] for i in ready]
        prefilled = [req for req in batch.prefill_reqs if req.kv_len == req.fill_len]
        for req in batch.reqs:
            if req.kv_len < req.fill_len:
                self._cache_chunked_prefix(req)
        launched = None
        if ready:
            rows = (
                logits
                if len(ready) == len(batch.reqs)
                else logits[to_device(ready, torch.int64, logits.device)]
            )
            launched = InflightBatch(ready_reqs, self.runner.sample_async(rows, ready_reqs))
            for req in ready_reqs:
                req.num_pending_tokens += 1
        # A request with all its tokens sampled leaves at once: its finish is certain.
        self.running = [req for req in self.running + prefilled if not req.sampled_all]
        return launched

    def _process_inflight(self) -> None:
        """Take in the tokens of the forward in flight: append them, finish requests, free KV."""
        launched, self._inflight = self._inflight, None
        if launched is None:
            return
        sampled = launched.sample.wait()
        for req in launched.reqs:
            req.num_pending_tokens -= 1
        self._append_tokens(launched.reqs, sampled)
        for req in launched.reqs:
            if req.finished:
                self._release_kv(req)
        self.running = [req for req in self.running if not req.finished]

    def _append_tokens(self, reqs: list[Req], sampled: SampleOutput) -> None:
        for i, (req, token_id) in enumerate(zip(reqs, sampled.next_token_ids)):
            if req.finished:  # aborted, or stopped by its previous token, meanwhile
                continue
            req.output_ids.append(token_id)
            if req.return_logprob:
                req.logprobs.append(sampled.logprobs[i])
            if req.top_logprobs_num:
                req.top_logprobs.append(sampled.top_logprobs[i])
            self.num_generated_tokens += 1
            finish_reason = self._check_finish(req)
            if finish_reason is not None:
                self._finish(req, finish_reason)
            elif req.stream:
                self._outbox[req.rid] = req

    def _check_finish(self, req: Req) -> FinishReason | None:
        params = req.sampling_params
        token_id = req.output_ids[-1]
        if token_id in (params.stop_token_ids or ()) or (
            not params.ignore_eos and token_id in self.eos_token_ids
        ):
            return FinishReason("stop", token_id)
        if params.stop and self.tokenizer is not None:
            matched = tail_contains_stop(
                self.tokenizer,
                req.output_ids,
                params.stop,
                max(map(len, params.stop)),
                params.skip_special_tokens,
            )
            if matched is not None:
                return FinishReason("stop", matched)
        if len(req.output_ids) >= params.max_new_tokens:
            return FinishReason("length")
        return None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = reason
        self._outbox[req.rid] = req

    # ------------------------------------------------------------------ KV bookkeeping

    def _available_tokens(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size()

    def _alloc_slots(self, n: int) -> torch.Tensor:
        shortfall = n - self.allocator.available_size()
        if shortfall > 0:
            self.tree_cache.evict(shortfall)
        slots = self.allocator.alloc(n)
        if slots is None:  # scheduling only admits what fits
            raise RuntimeError(
                f"out of KV slots: needed {n}, {self.allocator.available_size()} free"
            )
        return slots

    def _release_kv(self, req: Req) -> None:
        """Hand the request's KV to the radix cache and give its row back."""
        if req.req_pool_idx is None:
            return
        slots = self.req_to_token_pool.slots(req.req_pool_idx, req.kv_len)
        already_cached = self.tree_cache.insert(req.fill_ids[: req.kv_len], slots)
        self.allocator.free(slots[req.prefix_len : already_cached])
        self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.reset_kv_state()

    def _cache_chunked_prefix(self, req: Req) -> None:
        """Share the prefilled part of a chunked prompt at once, locked until the next chunk."""
        if self.tree_cache.disable:
            return
        key = req.fill_ids[: req.kv_len]
        slots = self.req_to_token_pool.slots(req.req_pool_idx, req.kv_len)
        already_cached = self.tree_cache.insert(key, slots)
        self.allocator.free(slots[req.prefix_len : already_cached])
        prefix, last_node = self.tree_cache.match_prefix(key)
        self.req_to_token_pool.write_prefix(req.req_pool_idx, prefix)
        self.tree_cache.inc_lock_ref(last_node)
        self.tree_cache.dec_lock_ref(req.last_node)
        req.prefix_len, req.last_node = len(prefix), last_node

    # ------------------------------------------------------------------ outputs

    def _live_reqs(self) -> list[Req]:
        encoding = [job.req for job in self.encoding]
        chunked = [self.chunked_req] if self.chunked_req is not None else []
        return encoding + self.waiting + chunked + self.running

    def _drain_outputs(self) -> list[TokenOutput]:
        outputs = [self._token_output(req) for req in self._outbox.values()]
        self._outbox.clear()
        return outputs

    def _token_output(self, req: Req) -> TokenOutput:
        start = req.num_sent_ids
        output = TokenOutput(
            rid=req.rid,
            new_token_ids=req.output_ids[start:],
            finish_reason=req.finish_reason.to_dict() if req.finished else None,
            prompt_tokens=len(req.origin_input_ids),
            cached_tokens=req.cached_tokens or 0,
            new_logprobs=req.logprobs[start:] if req.return_logprob else None,
            new_top_logprobs=req.top_logprobs[start:] if req.top_logprobs_num else None,
            mm_meta=req.mm_meta if start == 0 else None,
        )
        req.num_sent_ids = len(req.output_ids)
        return output

    # ------------------------------------------------------------------ process loop

    def event_loop(self, recv_socket: zmq.Socket, send_socket: zmq.Socket) -> None:
        """Serve forever: poll for messages without blocking while there is work, block when
        idle."""
        while True:
            for message in recv_all(recv_socket, block=not self.has_work):
                reply = self.handle_message(message)
                if reply is not None:
                    send_socket.send_pyobj(reply)
            outputs = self.step()
            if outputs:
                send_socket.send_pyobj(BatchTokenOutput(outputs))


def run_scheduler_process(
    server_args: ServerArgs, addresses: EngineAddresses, ready_conn: Any, parent_pid: int
) -> None:
    """Entry point of the engine process."""
    init_engine_process(parent_pid, server_args.log_level)
    try:
        scheduler = build_scheduler(server_args)
        context = zmq.Context()
        recv_socket = connect(context, zmq.PULL, addresses.to_engine)
        send_socket = connect(context, zmq.PUSH, addresses.from_engine)
    except Exception as err:
        report_startup_failure(ready_conn, err)
        return
    ready_conn.send(_engine_info(server_args, scheduler))
    ready_conn.close()
    scheduler.event_loop(recv_socket, send_socket)


def use_overlap_schedule(server_args: ServerArgs, device: torch.device) -> bool:
    """On by default on CUDA; on CPU every op finishes before the host goes on, so overlap
    would only delay each output by a step."""
    if server_args.enable_overlap_schedule is not None:
        return server_args.enable_overlap_schedule
    return device.type == "cuda"


def default_chunked_prefill_size(device: torch.device) -> int:
    """SGLang's choice for large GPUs; on CPU a smaller chunk keeps streams' latency low."""
    return 8192 if device.type == "cuda" else 2048


def build_scheduler(server_args: ServerArgs) -> Scheduler:
    """The engine process's model runner and scheduler for ``server_args``."""
    model_path = server_args.model_path
    runner = ModelRunner(server_args, load_model_config(model_path))
    tokenizer = load_tokenizer(server_args.tokenizer_path or model_path)
    return Scheduler(server_args, runner, tokenizer, get_eos_token_ids(tokenizer, model_path))


def _engine_info(server_args: ServerArgs, scheduler: Scheduler) -> EngineInfo:
    runner = scheduler.runner
    return EngineInfo(
        model_path=server_args.model_path,
        dtype=str(runner.dtype).removeprefix("torch."),
        kv_capacity_tokens=runner.max_total_tokens,
        context_len=runner.context_len,
        vocab_size=runner.vocab_size,
        eos_token_ids=tuple(sorted(scheduler.eos_token_ids)),
        max_running_requests=runner.max_running_requests,
    )
