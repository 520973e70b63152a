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

The helpers below (environment, HF model, timed generation, result lines) are shared with
``cubeserve.bench.throughput``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

import cubeserve
from cubeserve.engine.model_runner import (
    load_model_config,
    resolve_device,
    resolve_dtype,
)
from cubeserve.server_args import ServerArgs

DEFAULT_RESULTS_DIR = Path(__file__).parent / "results"


# ---- shared with bench.throughput ----------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--skip-hf", action="store_true", help="time cubeserve only")
    parser.add_argument("--save", action="store_true", help="append results to --results-dir")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--run-name", default="", help="free-form label stored with the results")
    parser.add_argument("--seed", type=int, default=1)


def resolved_model_path(server_args: ServerArgs) -> str:
    if server_args.model_path is not None:
        return server_args.model_path
    from cubeserve.demo import ensure_demo_model

    return ensure_demo_model()


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "triton", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "cubeserve": cubeserve.__version__,
        **versions,
    }


def random_prompts(rng: random.Random, lengths: Sequence[int], vocab_size: int) -> list[list[int]]:
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def start_engine(server_args: ServerArgs) -> cubeserve.Engine:
    fields = {f.name: getattr(server_args, f.name) for f in dataclasses.fields(ServerArgs)}
    fields.pop("extra")
    return cubeserve.Engine(**fields)


def cubeserve_generate(
    engine: cubeserve.Engine, prompts: list[list[int]], output_lens: Sequence[int]
) -> float:
    """Seconds to generate exactly ``output_lens[i]`` tokens for ``prompts[i]``, all at once."""
    params = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in output_lens]
    start = time.perf_counter()
    outputs = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    produced = [out["meta_info"]["completion_tokens"] for out in outputs]
    if produced != list(output_lens):
        raise RuntimeError(f"cubeserve produced {produced} tokens, expected {list(output_lens)}")
    return elapsed


class HFModel:
    """The same architecture in HF transformers: the checkpoint's weights, or random ones for
    ``--load-format dummy`` (initialised on the device: a 7B model inits in seconds there)."""

    def __init__(self, server_args: ServerArgs, config: PretrainedConfig) -> None:
        from transformers import AutoModelForCausalLM

        path = resolved_model_path(server_args)
        self.device = resolve_device(server_args.device)
        dtype = resolve_dtype(server_args.dtype, config, self.device)
        if server_args.load_format == "dummy":
            with self.device:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        self.model = model.to(self.device).eval()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Seconds to generate exactly ``new_tokens`` tokens per prompt (left-padded batch)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self._synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        self._synchronize()
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the GPU memory before the cubeserve engine sizes its KV pool."""
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def emit(record: dict[str, Any], name: str, args: argparse.Namespace) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if args.save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        with open(args.results_dir / f"{name}.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


# ---- latency ---------------------------------------------------------------------------------

Shape = tuple[int, int, int]  # batch size, input length, output length
Generate = Callable[[list[list[int]], Sequence[int]], float]


def measure_shape(
    generate: Generate, shape: Shape, rng: random.Random, vocab_size: int
) -> dict[str, float]:
    batch_size, input_len, output_len = shape

    def timed(new_tokens: int) -> float:
        # Best of three runs: the minimum is the least noisy estimate of the cost itself.
        runs = []
        for _ in range(3):
            prompts = random_prompts(rng, [input_len] * batch_size, vocab_size)
            runs.append(generate(prompts, [new_tokens] * batch_size))
        return min(runs)

    ttft = timed(1)
    total = timed(output_len) if output_len > 1 else ttft
    decode_ms = 1000 * (total - ttft) / (output_len - 1) if output_len > 1 else None
    return {
        "ttft_s": round(ttft, 6),
        "prefill_tok_s": round(batch_size * input_len / ttft, 1),
        "decode_ms_per_token": None if decode_ms is None else round(decode_ms, 3),
        "output_tok_s": round(batch_size * output_len / total, 1),
    }


def run_all(generate: Generate, shapes: list[Shape], seed: int, vocab_size: int) -> list[dict]:
    rng = random.Random(seed)
    generate([random_prompts(rng, [8], vocab_size)[0]], [2])  # warm-up: compilation, allocators
    return [measure_shape(generate, shape, rng, vocab_size) for shape in shapes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, nargs="+", default=[16])
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    shapes = list(itertools.product(args.batch_size, args.input_len, args.output_len))
    config = load_model_config(resolved_model_path(server_args))
    vocab_size = config.get_text_config().vocab_size

    # HF first: its memory is freed before cubeserve sizes its KV pool from what is free.
    hf_results: list[dict | None] = [None] * len(shapes)
    if not args.skip_hf:
        hf = HFModel(server_args, config)
        hf_results = run_all(lambda p, n: hf.generate(p, n[0]), shapes, args.seed, vocab_size)
        hf.close()
    with start_engine(server_args) as engine:
        results = run_all(
            lambda p, n: cubeserve_generate(engine, p, n), shapes, args.seed, vocab_size
        )

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
