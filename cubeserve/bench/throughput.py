"""Offline throughput of cubeserve vs. HF transformers (SGLang ``bench_offline_throughput`` shape).

``--num-prompts`` requests with input and output lengths drawn uniformly from
``--input-len-range`` and ``--output-len-range`` (random token ids, fixed seed). cubeserve gets
them all at once and schedules them itself (continuous batching); HF transformers generates
them in static batches of ``--hf-batch-size``, each padded to its longest prompt and run to its
longest output, the way ``generate`` works. Both count only the requested output tokens.
One JSON line is printed (and appended to ``<results-dir>/throughput.jsonl`` with ``--save``)::

    python -m cubeserve.bench.throughput --model-path Qwen/Qwen2.5-7B-Instruct \\
        --load-format dummy --num-prompts 512 --input-len-range 256 1024 \\
        --output-len-range 64 256 --save
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import cubeserve
from cubeserve.bench.common import (
    HFModel,
    add_common_args,
    bench_model_config,
    cubeserve_generate,
    emit,
    environment,
    random_prompts,
    ratio,
    resolved_model_path,
)
from cubeserve.server_args import ServerArgs


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The requests' number and length ranges (shared with ``bench.roofline``)."""
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument(
        "--input-len-range",
        type=int,
        nargs=2,
        default=[128, 512],
        metavar=("MIN", "MAX"),
    )
    parser.add_argument(
        "--output-len-range",
        type=int,
        nargs=2,
        default=[32, 128],
        metavar=("MIN", "MAX"),
    )


def sample_requests(
    args: argparse.Namespace, vocab: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    input_lens, output_lens = _draw_lengths(rng, args)
    return random_prompts(rng, input_lens, vocab), output_lens


def sample_lengths(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The input and output lengths of ``sample_requests``' requests."""
    return _draw_lengths(random.Random(args.seed), args)


def _draw_lengths(rng: random.Random, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    input_lens = [rng.randint(*args.input_len_range) for _ in range(args.num_prompts)]
    output_lens = [rng.randint(*args.output_len_range) for _ in range(args.num_prompts)]
    return input_lens, output_lens


def summarize(seconds: float, prompts: list[list[int]], output_lens: list[int]) -> dict[str, float]:
    input_tokens, output_tokens = sum(map(len, prompts)), sum(output_lens)
    return {
        "duration_s": round(seconds, 6),
        "request_s": round(len(prompts) / seconds, 3),
        "input_tok_s": round(input_tokens / seconds, 1),
        "output_tok_s": round(output_tokens / seconds, 1),
        "total_tok_s": round((input_tokens + output_tokens) / seconds, 1),
    }


def hf_static_batches(
    hf: HFModel, prompts: list[list[int]], output_lens: list[int], batch_size: int
) -> float:
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        seconds += hf.generate(prompts[chunk], max(output_lens[chunk]))[0]
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    add_workload_args(parser)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="run HF on only the first N requests (its static batches run at one speed whatever "
        "their number; default: all of them)",
    )
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    config = bench_model_config(server_args)
    vocab = range(config.get_text_config().vocab_size)
    prompts, output_lens = sample_requests(args, vocab)
    warmup_prompts = random_prompts(random.Random(-args.seed), [16, 16], vocab)

    # HF first: its memory is freed before cubeserve sizes its KV pool from what is free.
    hf_result = None
    if not args.skip_hf:
        hf = HFModel(server_args, config)
        hf.generate(warmup_prompts, 2)
        hf_prompts, hf_output_lens = (
            prompts[: args.hf_num_prompts],
            output_lens[: args.hf_num_prompts],
        )
        hf_seconds = hf_static_batches(hf, hf_prompts, hf_output_lens, args.hf_batch_size)
        hf_result = summarize(hf_seconds, hf_prompts, hf_output_lens)
        hf.close()
    with cubeserve.Engine.from_server_args(server_args) as engine:
        cubeserve_generate(engine, warmup_prompts, [2, 2])
        seconds, _ = cubeserve_generate(engine, prompts, output_lens)
        ours = summarize(seconds, prompts, output_lens)

    emit(
        {
            "bench": "throughput",
            "run_name": args.run_name,
            "model": resolved_model_path(server_args),
            "load_format": server_args.load_format,
            "num_prompts": args.num_prompts,
            "input_len_range": args.input_len_range,
            "output_len_range": args.output_len_range,
            "hf_batch_size": None if args.skip_hf else args.hf_batch_size,
            "hf_num_prompts": None if args.skip_hf else len(prompts[: args.hf_num_prompts]),
            "cubeserve": ours,
            "hf": hf_result,
            "speedup_vs_hf": None
            if hf_result is None
            else ratio(ours["output_tok_s"], hf_result["output_tok_s"]),
            "env": environment(),
        },
        "throughput",
        args,
    )


if __name__ == "__main__":
    main()
