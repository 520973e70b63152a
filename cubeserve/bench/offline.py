"""Offline throughput: cubeserve's ``Engine`` against HF transformers ``generate``.

    python -m cubeserve.bench.offline [--model-path DIR] [--num-prompts 16 --input-len 32 --output-len 32]

Both sides get the same random prompts (exactly ``--input-len`` token ids each, no special
tokens, so no padding is ever needed) and the same weights, decode greedily and ignore EOS, so
each prompt yields exactly ``--output-len`` tokens. HF runs all prompts as ONE batched
``generate`` call; cubeserve receives them as one batch and schedules them itself. Start-up and
weight loading are excluded, each side is warmed up first, and the two run one after the other
so they never share the machine. Prints one JSON line (appended to
``<results-dir>/offline.jsonl`` with ``--save``); ``greedy_outputs_match`` is the share of
prompts whose tokens agree exactly (expect 1.0 in float32; low precision may drift).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from transformers import PretrainedConfig

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
from cubeserve.engine.model_runner import resolve_device
from cubeserve.server_args import ServerArgs

WARMUP_TOKENS = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cubeserve.bench.offline", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, default_seed=0)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    return parser.parse_args(argv)


def run_cubeserve(
    engine: cubeserve.Engine, prompts: list[list[int]], output_len: int
) -> tuple[float, list[list[int]]]:
    """Seconds for the whole batch, and each prompt's output ids."""
    cubeserve_generate(engine, prompts[:1], [WARMUP_TOKENS])
    engine.flush_cache()  # no prefix-cache hit from the warm-up
    return cubeserve_generate(engine, prompts, [output_len] * len(prompts))


def run_hf(
    server_args: ServerArgs, config: PretrainedConfig, prompts: list[list[int]], output_len: int
) -> tuple[float, list[list[int]]]:
    """Seconds for one batched greedy ``generate`` call, and each prompt's output ids."""
    hf = HFModel(server_args, config)
    try:
        hf.generate(prompts[:1], WARMUP_TOKENS)
        return hf.generate(prompts, output_len)
    finally:
        hf.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    config = bench_model_config(server_args)
    with cubeserve.Engine.from_server_args(server_args) as engine:
        dtype = engine.tokenizer_manager.info.dtype
        special = set(engine.tokenizer.all_special_ids)
        vocab = [token for token in range(len(engine.tokenizer)) if token not in special]
        rng = random.Random(args.seed)
        prompts = random_prompts(rng, [args.input_len] * args.num_prompts, vocab)
        cubeserve_s, cubeserve_ids = run_cubeserve(engine, prompts, args.output_len)
    hf_s, hf_ids = (None, None) if args.skip_hf else run_hf(server_args, config, prompts, args.output_len)

    output_tokens = args.num_prompts * args.output_len
    emit(
        {
            "bench": "offline",
            "run_name": args.run_name,
            "model": resolved_model_path(server_args),
            "device": resolve_device(server_args.device).type,
            "dtype": dtype,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "cubeserve_output_tok_s": round(output_tokens / cubeserve_s, 1),
            "hf_output_tok_s": None if hf_s is None else round(output_tokens / hf_s, 1),
            "speedup": ratio(hf_s, cubeserve_s),
            "greedy_outputs_match": None
            if hf_ids is None
            else sum(a == b for a, b in zip(cubeserve_ids, hf_ids)) / args.num_prompts,
            "env": environment(),
        },
        "offline",
        args,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
