"""Inter-token latency of running streams while large prompts arrive, with mixed chunked
prefill off and on, in one run.

For each mode an ``Engine`` (the demo model unless ``--model-path``) keeps ``--streams``
greedy requests decoding. After a ``--baseline-s`` window, ``--inject-requests`` prompts of
``--inject-input-len`` tokens arrive ``--inject-interval-s`` apart; the injection window lasts
until the last of them has finished. The gaps between the streams' chunks are summarised per
window (ms: mean, p50, p90, p99, max), and one JSON line compares the modes (appended to
``<results-dir>/itl.jsonl`` with ``--save``)::

    python -m cubeserve.bench.itl --device cpu --chunked-prefill-size 512 --save

Prefill-only forwards stall every stream for as long as prompts are queued; mixed forwards
bound a stall by one chunk's forward, which ``--chunked-prefill-size`` sizes. The KV pool is
sized to hold the whole workload (unless ``--max-total-tokens``), so admission never waits
for memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cubeserve
from cubeserve.bench.common import (
    DEFAULT_RESULTS_DIR,
    bench_model_config,
    emit,
    environment,
    random_prompts,
    ratio,
    resolved_model_path,
)
from cubeserve.bench.serving import StreamWindow, injection_window, summarize
from cubeserve.server_args import ServerArgs

MODES = {"prefill_only": False, "mixed": True}  # report key -> --enable-mixed-chunk
T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    streams: int
    stream_input_len: int
    stream_output_len: int
    inject_requests: int
    inject_input_len: int
    inject_output_len: int
    inject_interval_s: float
    baseline_s: float

    @property
    def kv_tokens(self) -> int:
        """KV of every request at once."""
        return self.streams * (self.stream_input_len + self.stream_output_len) + (
            self.inject_requests * (self.inject_input_len + self.inject_output_len)
        )


@dataclass
class StreamTimes:
    start: float
    token_times: list[float]  # arrival of each chunk that carried new tokens


async def stream(
    engine: cubeserve.Engine,
    input_ids: list[int],
    max_new_tokens: int,
    stop: asyncio.Event | None = None,
    times: StreamTimes | None = None,
) -> StreamTimes:
    """Stream one greedy request into ``times`` (default: new ones, from now); setting ``stop``
    ends it early (the engine aborts it)."""
    times = times or StreamTimes(time.perf_counter(), [])
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    chunks = await engine.async_generate(input_ids=input_ids, sampling_params=params, stream=True)
    received = 0
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if chunk["meta_info"]["completion_tokens"] > received:
                received = chunk["meta_info"]["completion_tokens"]
                times.token_times.append(time.perf_counter())
            if stop is not None and stop.is_set():
                break
    return times


async def streams_around(
    engine: cubeserve.Engine,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    baseline_s: float,
    inject: Callable[[], Awaitable[T]],
) -> tuple[T, StreamWindow, list[StreamTimes]]:
    """Stream ``prompts`` through ``injection_window`` around ``inject()``: its result, the
    streams' gaps around it, and the streams' token times."""
    stop = asyncio.Event()
    streams = [StreamTimes(time.perf_counter(), []) for _ in prompts]
    coroutines = [
        stream(engine, prompt, max_new_tokens, stop, times)
        for prompt, times in zip(prompts, streams)
    ]
    result, window = await injection_window(
        coroutines, [t.token_times for t in streams], stop, baseline_s, inject
    )
    return result, window, streams


async def measure(
    engine: cubeserve.Engine, workload: Workload, rng: random.Random, vocab: Sequence[int]
) -> dict[str, Any]:
    """Run ``workload`` once: streams, baseline window, injection window."""
    # Warm-up: the first extend and decode forwards pay one-off allocation costs.
    await engine.async_generate(
        input_ids=random_prompts(rng, [workload.inject_input_len], vocab)[0],
        sampling_params={"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
    )

    async def inject() -> list[StreamTimes]:
        injected = []
        lengths = [workload.inject_input_len] * workload.inject_requests
        for prompt in random_prompts(rng, lengths, vocab):
            injected.append(asyncio.create_task(stream(engine, prompt, workload.inject_output_len)))
            await asyncio.sleep(workload.inject_interval_s)
        return list(await asyncio.gather(*injected))

    prompts = random_prompts(rng, [workload.stream_input_len] * workload.streams, vocab)
    injected_times, window, streams = await streams_around(
        engine, prompts, workload.stream_output_len, workload.baseline_s, inject
    )
    baseline_ms, injection_ms = summarize(window.before), summarize(window.during)
    return {
        "baseline_itl_ms": baseline_ms,
        "injection_itl_ms": injection_ms,
        "injection_over_baseline": {
            key: ratio(injection_ms[key], baseline_ms[key]) for key in ("p50", "p99", "max")
        },
        "injection_s": round(window.end - window.start, 3),
        "injected_ttft_ms": summarize([t.token_times[0] - t.start for t in injected_times]),
        "streams_outlived_injection": sum(t.token_times[-1] >= window.end for t in streams),
    }


def run_mode(server_args: ServerArgs, workload: Workload, seed: int, vocab: Sequence[int]) -> dict:
    with cubeserve.Engine.from_server_args(server_args) as engine:
        return asyncio.run(measure(engine, workload, random.Random(seed), vocab))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ServerArgs.add_cli_args(parser)
    # stdout carries the JSON result: only the engine's warnings and errors may join it.
    parser.set_defaults(log_level="warning")
    add = parser.add_argument
    add("--streams", type=int, default=4, help="requests decoding throughout")
    add("--stream-input-len", type=int, default=32)
    add("--stream-output-len", type=int, default=3000, help="enough to outlive the injection")
    add("--inject-requests", type=int, default=8)
    add("--inject-input-len", type=int, default=3000)
    add("--inject-output-len", type=int, default=4)
    add("--inject-interval-s", type=float, default=0.02, help="a burst: prompts queue up")
    add("--baseline-s", type=float, default=2.0)
    add("--save", action="store_true", help="append the result to --results-dir/itl.jsonl")
    add("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    add("--run-name", default="", help="free-form label stored with the result")
    add("--seed", type=int, default=0, help="seed of the random prompts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workload = Workload(
        args.streams,
        args.stream_input_len,
        args.stream_output_len,
        args.inject_requests,
        args.inject_input_len,
        args.inject_output_len,
        args.inject_interval_s,
        args.baseline_s,
    )
    server_args = ServerArgs.from_cli_args(args)
    if server_args.max_total_tokens is None:
        server_args.max_total_tokens = workload.kv_tokens
    vocab = range(bench_model_config(server_args).get_text_config().vocab_size)
    reports = {
        name: run_mode(
            dataclasses.replace(server_args, enable_mixed_chunk=mixed), workload, args.seed, vocab
        )
        for name, mixed in MODES.items()
    }
    off, on = (reports[name]["injection_itl_ms"] for name in MODES)
    record = {
        "bench": "itl",
        "run_name": args.run_name,
        "model": resolved_model_path(server_args),
        "chunked_prefill_size": server_args.chunked_prefill_size,
        "workload": dataclasses.asdict(workload),
        **reports,
        "mixed_over_prefill_only": {key: ratio(on[key], off[key]) for key in ("p50", "p99", "max")},
        "env": environment(),
    }
    emit(record, "itl", args)


if __name__ == "__main__":
    main()
