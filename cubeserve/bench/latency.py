"""Static-batch latency of cubeserve vs. HF transformers (SGLang ``bench_one_batch`` shape).

For every batch size x input length x output length, both engines get the same shapes and
the same weights (random at full size with ``--load-format dummy``) and are timed alike:
one generation of a single token gives the time to first token (the whole batch's prefill),
a second of ``output_len`` tokens gives the decode time, ``(t_out - t_first) / (output_len - 1)``
per output token. Every generation gets fresh random prompts, so the prefix cache never hits.
One JSON line per shape is printed (and appended to ``<results-dir>/latency.jsonl`` with
``--save``)::

    python -m cubeserve.bench.latency --model-path Qwen/Qwen2.5-7B-Instruct --load-format dummy \\
        --batch-size 1 32 --input-len 1024 --output-len 128 --save

With no ``--model-path`` it runs the built-in demo model (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable, Sequence

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

Shape = tuple[int, int, int]  # batch size, input length, output length
Generate = Callable[[list[list[int]], Sequence[int]], float]


def measure_shape(
    generate: Generate,
    shape: Shape,
    rng: random.Random,
    vocab: Sequence[int],
    repeats: int,
) -> dict[str, float]:
    batch_size, input_len, output_len = shape

    def timed(new_tokens: int) -> float:
        # Best of ``repeats`` runs: the minimum is the least noisy estimate of the cost itself.
        runs = []
        for _ in range(repeats):
            prompts = random_prompts(rng, [input_len] * batch_size, vocab)
            runs.append(generate(prompts, [new_tokens] * batch_size))
        return min(runs)

    # One untimed pass at this shape: kernels tuned or compiled for new sizes stay out of it.
    generate(random_prompts(rng, [input_len] * batch_size, vocab), [2] * batch_size)
    ttft = timed(1)
    total = timed(output_len) if output_len > 1 else ttft
    decode_ms = 1000 * (total - ttft) / (output_len - 1) if output_len > 1 else None
    return {
        "ttft_s": round(ttft, 6),
        "prefill_tok_s": round(batch_size * input_len / ttft, 1),
        "decode_ms_per_token": None if decode_ms is None else round(decode_ms, 3),
        "output_tok_s": round(batch_size * output_len / total, 1),
    }


def run_all(
    generate: Generate,
    shapes: list[Shape],
    args: argparse.Namespace,
    vocab: Sequence[int],
) -> list[dict]:
    rng = random.Random(args.seed)
    generate(random_prompts(rng, [8], vocab), [2])  # warm-up: compilation, allocators
    return [measure_shape(generate, shape, rng, vocab, args.repeats) for shape in shapes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        action="append",
        metavar=("BS", "IN", "OUT"),
        help="measure exactly these shapes (repeatable) instead of the product of the lists",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best kept)")
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    shapes = (
        [tuple(shape) for shape in args.shape]
        if args.shape
        else list(itertools.product(args.batch_size, args.input_len, args.output_len))
    )
    config = bench_model_config(server_args)
    vocab = range(config.get_text_config().vocab_size)

    # HF first: its memory is freed before cubeserve sizes its KV pool from what is free.
    hf_results: list[dict | None] = [None] * len(shapes)
    if not args.skip_hf:
        hf = HFModel(server_args, config)
        hf_results = run_all(lambda p, n: hf.generate(p, n[0])[0], shapes, args, vocab)
        hf.close()
    with cubeserve.Engine.from_server_args(server_args) as engine:
        results = run_all(lambda p, n: cubeserve_generate(engine, p, n)[0], shapes, args, vocab)

    env = environment()
    for (batch_size, input_len, output_len), ours, theirs in zip(shapes, results, hf_results):
        emit(
            {
                "bench": "latency",
                "run_name": args.run_name,
                "model": resolved_model_path(server_args),
                "load_format": server_args.load_format,
                "batch_size": batch_size,
                "input_len": input_len,
                "output_len": output_len,
                "cubeserve": ours,
                "hf": theirs,
                "speedup_vs_hf": None
                if theirs is None
                else {
                    "prefill": ratio(ours["prefill_tok_s"], theirs["prefill_tok_s"]),
                    "decode": ratio(theirs["decode_ms_per_token"], ours["decode_ms_per_token"]),
                    "output": ratio(ours["output_tok_s"], theirs["output_tok_s"]),
                },
                "env": env,
            },
            "latency",
            args,
        )


if __name__ == "__main__":
    main()
