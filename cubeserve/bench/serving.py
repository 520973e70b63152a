"""Online serving benchmark for any OpenAI-compatible endpoint (cubeserve, SGLang, vLLM...).

Two scenarios, both printing one JSON document (and writing it with ``--output-file``):

``load`` (default)
    Sends ``--num-prompts`` streaming requests (random or ShareGPT-style lengths) at
    ``--request-rate`` (Poisson arrivals; ``inf``: all at once), at most ``--max-concurrency``
    in flight, and reports TTFT / ITL / TPOT / E2E latency (mean, p50, p90, p99) and throughput.
``interference``
    Checks that decoding requests are not stalled by new arrivals: keeps
    ``--background-requests`` long streams decoding, measures their inter-token latency for
    ``--baseline-s``, then injects ``--inject-requests`` large prompts and reports the
    background ITL before vs during the injection.

Token counts come from the server's ``usage`` (``stream_options.include_usage``), so no
tokenizer is needed; ``--tokenizer`` only makes random prompt lengths exact.

    python -m cubeserve.bench.serving --base-url http://127.0.0.1:30000 --num-prompts 200 \\
        --random-input-len 1024 --random-output-len 128 --request-rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

# Common English words: about one token each for typical BPE vocabularies.
_WORDS = tuple(
    "the of and to in is was for on are with as by at from that this it be or have an not "
    "but they his her which one all were we when there can more if no out so what up about "
    "into than them some time only new could over after other also many then these two may "
    "first most any where such through back years much before good very well each world "
    "long between both life being under never day same another know while last might great".split()
)
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048
MIN_SHAREGPT_TOKENS = 4
CHARS_PER_TOKEN = 4  # length estimate for ShareGPT replies when no tokenizer is given
T = TypeVar("T")


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # absolute time of each content chunk
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []


@dataclass(frozen=True)
class Target:
    base_url: str
    endpoint: str  # "completions" or "chat"
    model: str
    api_key: str | None
    ignore_eos: bool

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            payload["ignore_eos"] = True  # SGLang / vLLM / cubeserve extension: exact output lengths
        if self.endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            payload["prompt"] = spec.prompt
        return payload

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def chunk_text(endpoint: str, choice: dict[str, Any]) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, target: Target, spec: RequestSpec,
                       stop: asyncio.Event | None = None,
                       result: RequestResult | None = None) -> RequestResult:
    """One streaming request into ``result`` (default: a new one, from now); content chunk times
    give TTFT and inter-token latencies.

    Setting ``stop`` ends the request early (the connection is closed, the server aborts it).
    """
    result = result or RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", target.url, json=target.payload(spec), headers=target.headers()) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in response.aiter_lines():
                _consume_event(line, target.endpoint, result)
                if stop is not None and stop.is_set():
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - result.start
    if result.chunk_times:
        result.ttft = result.chunk_times[0] - result.start
    result.ok = not result.error and bool(result.chunk_times)
    result.output_tokens = result.output_tokens or len(result.chunk_times)
    return result


def _consume_event(line: str, endpoint: str, result: RequestResult) -> None:
    if not line.startswith("data:"):
        return
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        return
    event = json.loads(data)
    if "error" in event:
        result.error = str(event["error"].get("message", event["error"]))
        return
    if any(chunk_text(endpoint, choice) for choice in event.get("choices") or []):
        result.chunk_times.append(time.perf_counter())
    if event.get("usage"):
        result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
        result.output_tokens = event["usage"].get("completion_tokens", 0)


# --------------------------------------------------------------------------- workloads


class PromptMaker:
    """Prompts of about ``n`` tokens: exact with a tokenizer, otherwise random common words."""

    def __init__(self, rng: random.Random, tokenizer_path: str | None) -> None:
        self.rng = rng
        self.tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def random_prompt(self, num_tokens: int) -> str:
        if self.tokenizer is None:
            return " ".join(self.rng.choice(_WORDS) for _ in range(num_tokens))
        vocab = self.tokenizer.vocab_size
        ids = [self.rng.randrange(vocab) for _ in range(num_tokens)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, len(text) // CHARS_PER_TOKEN)
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def random_specs(
    maker: PromptMaker, num: int, input_len: int, output_len: int, range_ratio: float
) -> list[RequestSpec]:
    """Lengths uniform in [len * range_ratio, len] (range_ratio 1: fixed lengths)."""

    def draw(length: int) -> int:
        return maker.rng.randint(max(1, int(length * range_ratio)), length)

    return [RequestSpec(maker.random_prompt(draw(input_len)), draw(output_len)) for _ in range(num)]


def sharegpt_specs(maker: PromptMaker, path: str, num: int, fixed_output_len: int | None) -> list[RequestSpec]:
    """First human turn as the prompt, the reply's length as the output length."""
    conversations = json.loads(Path(path).read_text(encoding="utf-8"))
    maker.rng.shuffle(conversations)
    specs = []
    for conversation in conversations:
        turns = conversation.get("conversations") or conversation.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0]["value"], turns[1]["value"]
        prompt_len = maker.count_tokens(prompt)
        output_len = fixed_output_len or maker.count_tokens(reply)
        if prompt_len < MIN_SHAREGPT_TOKENS or output_len < MIN_SHAREGPT_TOKENS:
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT_TOKENS or prompt_len + output_len > SHAREGPT_MAX_TOTAL_TOKENS:
            continue
        specs.append(RequestSpec(prompt, output_len))
        if len(specs) == num:
            break
    if not specs:
        raise SystemExit(f"no usable conversations in {path}")
    return specs


# --------------------------------------------------------------------------- statistics


def summarize(values_s: list[float]) -> dict[str, float]:
    """Milliseconds: mean, median, tail percentiles and maximum."""
    if not values_s:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ms = np.asarray(values_s) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(ms.max()), "count": len(ms)}


def split_itls(chunk_times: list[float], window_start: float,
               window_end: float) -> tuple[list[float], list[float]]:
    """One stream's gaps between chunks: those ending by ``window_start``, and those ending in
    ``(window_start, window_end]``. A gap spanning ``window_start`` counts as inside: it is the
    stall the window's first event caused."""
    before, inside = [], []
    for previous, now in itertools.pairwise(chunk_times):
        if now <= window_start:
            before.append(now - previous)
        elif now <= window_end:
            inside.append(now - previous)
    return before, inside


@dataclass
class StreamWindow:
    """Running streams' chunk gaps before and during an injection window."""

    start: float
    end: float
    before: list[float]  # gaps (s) ending by ``start``
    during: list[float]  # gaps (s) ending in ``(start, end]``


async def injection_window(
    streams: Sequence[Awaitable[Any]],
    chunk_times: Sequence[list[float]],
    stop: asyncio.Event,
    baseline_s: float,
    inject: Callable[[], Awaitable[T]],
) -> tuple[T, StreamWindow]:
    """Run ``streams`` until each is decoding and then for ``baseline_s``, then await
    ``inject()`` while they keep decoding; set ``stop`` (which ends them) when it returns. Each
    stream appends its chunks' arrival times to its list in ``chunk_times`` as they come.
    Returns ``inject``'s result and the streams' gaps around it."""
    tasks = [asyncio.ensure_future(stream) for stream in streams]
    # A busy server can take longer than the baseline window to prefill the streams.
    while any(len(times) < 2 for times in chunk_times) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.005)
    await asyncio.sleep(baseline_s)
    start = time.perf_counter()
    result = await inject()
    end = time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    window = StreamWindow(start, end, [], [])
    for times in chunk_times:
        before, during = split_itls(times, start, end)
        window.before += before
        window.during += during
    return result, window


def load_report(results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "ttft_ms": summarize([r.ttft for r in done]),
        "itl_ms": summarize([gap for r in done for gap in r.itls]),
        "tpot_ms": summarize(tpots),
        "e2e_ms": summarize([r.e2e for r in done]),
    }


# --------------------------------------------------------------------------- scenarios


async def run_load(client: httpx.AsyncClient, target: Target, specs: list[RequestSpec],
                   request_rate: float, max_concurrency: int | None, rng: random.Random) -> dict[str, Any]:
    limit = asyncio.Semaphore(max_concurrency or len(specs))

    async def limited(spec: RequestSpec) -> RequestResult:
        async with limit:
            return await send_request(client, target, spec)

    start = time.perf_counter()
    tasks = []
    for spec in specs:
        tasks.append(asyncio.create_task(limited(spec)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return load_report(results, time.perf_counter() - start)


@dataclass(frozen=True)
class InterferencePlan:
    background_requests: int
    background_input_len: int
    background_output_len: int
    inject_requests: int
    inject_input_len: int
    inject_output_len: int
    inject_interval_s: float
    baseline_s: float


async def run_interference(client: httpx.AsyncClient, target: Target, plan: InterferencePlan,
                           maker: PromptMaker) -> dict[str, Any]:
    stop_background = asyncio.Event()
    background_start = time.perf_counter()
    background_results = [RequestResult(start=background_start)
                          for _ in range(plan.background_requests)]
    background = [
        send_request(client, target, RequestSpec(maker.random_prompt(plan.background_input_len),
                                                 plan.background_output_len), stop_background, result)
        for result in background_results
    ]

    async def inject() -> list[RequestResult]:
        injected = []
        for _ in range(plan.inject_requests):
            spec = RequestSpec(maker.random_prompt(plan.inject_input_len), plan.inject_output_len)
            injected.append(asyncio.create_task(send_request(client, target, spec)))
            await asyncio.sleep(plan.inject_interval_s)
        return list(await asyncio.gather(*injected))

    injected_results, window = await injection_window(
        background, [r.chunk_times for r in background_results], stop_background, plan.baseline_s,
        inject)
    itl_before, itl_during = summarize(window.before), summarize(window.during)
    outlived = sum(1 for r in background_results if r.chunk_times and r.chunk_times[-1] >= window.end)
    return {
        "itl_before_ms": itl_before,
        "itl_during_ms": itl_during,
        "itl_p50_ratio": itl_during["p50"] / itl_before["p50"] if itl_before["p50"] else None,
        "itl_p99_ratio": itl_during["p99"] / itl_before["p99"] if itl_before["p99"] else None,
        "injection_s": window.end - window.start,
        "background": {**load_report(background_results, window.end - background_start),
                       "outlived_injection": outlived},
        "injected": load_report(injected_results, window.end - window.start),
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cubeserve.bench.serving", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:30000")
    add("--endpoint", choices=("completions", "chat"), default="completions")
    add("--model", default=None, help="default: the first model of GET /v1/models")
    add("--api-key", default=None)
    add("--scenario", choices=("load", "interference"), default="load")
    add("--dataset", choices=("random", "sharegpt"), default="random")
    add("--dataset-path", default=None, help="ShareGPT-style JSON (list of {'conversations': [...]})")
    add("--num-prompts", type=int, default=100)
    add("--random-input-len", type=int, default=512)
    add("--random-output-len", type=int, default=128)
    add("--random-range-ratio", type=float, default=1.0)
    add("--sharegpt-output-len", type=int, default=None, help="fixed output length instead of the reply's")
    add("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals")
    add("--max-concurrency", type=int, default=None)
    add("--tokenizer", default=None, help="local tokenizer path: exact random prompt lengths")
    add("--no-ignore-eos", dest="ignore_eos", action="store_false",
        help="do not send ignore_eos (for servers that reject it, e.g. api.openai.com)")
    add("--background-requests", type=int, default=4)
    add("--background-input-len", type=int, default=32)
    add("--background-output-len", type=int, default=2048)
    add("--inject-requests", type=int, default=4)
    add("--inject-input-len", type=int, default=4096)
    add("--inject-output-len", type=int, default=8)
    add("--inject-interval-s", type=float, default=0.25)
    add("--baseline-s", type=float, default=2.0)
    add("--timeout-s", type=float, default=600.0)
    add("--seed", type=int, default=0)
    add("--output-file", default=None)
    return parser.parse_args(argv)


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    maker = PromptMaker(rng, args.tokenizer)
    base_url = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:
        model = args.model or await first_model(client, base_url, args.api_key)
        target = Target(base_url, args.endpoint, model, args.api_key, args.ignore_eos)
        if args.scenario == "interference":
            plan = InterferencePlan(
                args.background_requests, args.background_input_len, args.background_output_len,
                args.inject_requests, args.inject_input_len, args.inject_output_len,
                args.inject_interval_s, args.baseline_s,
            )
            report = await run_interference(client, target, plan, maker)
        else:
            if args.dataset == "sharegpt":
                if not args.dataset_path:
                    raise SystemExit("--dataset sharegpt needs --dataset-path")
                specs = sharegpt_specs(maker, args.dataset_path, args.num_prompts, args.sharegpt_output_len)
            else:
                specs = random_specs(maker, args.num_prompts, args.random_input_len,
                                     args.random_output_len, args.random_range_ratio)
            report = await run_load(client, target, specs, args.request_rate, args.max_concurrency, rng)
    config = {k: "inf" if isinstance(v, float) and math.isinf(v) else v
              for k, v in vars(args).items() if k != "api_key"}
    return {"scenario": args.scenario, "model": model, "config": config, **report}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.output_file:
        Path(args.output_file).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
