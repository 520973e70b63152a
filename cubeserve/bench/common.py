"""What the offline benchmarks (``latency``, ``throughput``, ``offline``) share: flags, the
environment record, random prompts, timed generation on cubeserve and on the HF transformers
baseline, and JSON result lines."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

import cubeserve
from cubeserve.engine.model_runner import load_model_config, resolve_device, resolve_dtype
from cubeserve.server_args import ServerArgs

DEFAULT_RESULTS_DIR = Path(__file__).parent / "results"


def add_common_args(parser: argparse.ArgumentParser, default_seed: int = 1) -> None:
    ServerArgs.add_cli_args(parser)
    # stdout carries the JSON results: only the engine's warnings and errors may join them.
    parser.set_defaults(log_level="warning")
    parser.add_argument("--skip-hf", action="store_true", help="time cubeserve only")
    parser.add_argument("--save", action="store_true", help="append results to --results-dir")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--run-name", default="", help="free-form label stored with the results")
    parser.add_argument("--seed", type=int, default=default_seed, help="seed of the random prompts")


def resolved_model_path(server_args: ServerArgs) -> str:
    if server_args.model_path is not None:
        return server_args.model_path
    from cubeserve.demo import ensure_demo_model

    return ensure_demo_model()


def bench_model_config(server_args: ServerArgs) -> PretrainedConfig:
    return load_model_config(resolved_model_path(server_args))


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


def random_prompts(
    rng: random.Random, lengths: Sequence[int], token_ids: Sequence[int]
) -> list[list[int]]:
    """One prompt per length, its ids drawn uniformly from ``token_ids``."""
    return [rng.choices(token_ids, k=n) for n in lengths]


def cubeserve_generate(
    engine: cubeserve.Engine, prompts: list[list[int]], output_lens: Sequence[int]
) -> tuple[float, list[list[int]]]:
    """Seconds to generate exactly ``output_lens[i]`` greedy tokens for ``prompts[i]``, all at
    once, and the output ids."""
    params = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in output_lens]
    start = time.perf_counter()
    outputs = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    produced = [out["meta_info"]["completion_tokens"] for out in outputs]
    if produced != list(output_lens):
        raise RuntimeError(f"cubeserve produced {produced} tokens, expected {list(output_lens)}")
    return elapsed, [out["output_ids"] for out in outputs]


class HFModel:
    """The language model in HF transformers (for a Quicksviewer checkpoint: its LM backbone),
    with the checkpoint's weights, or random ones for ``--load-format dummy`` (initialised on the
    device: a 7B model inits in seconds there)."""

    def __init__(self, server_args: ServerArgs, config: PretrainedConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(server_args.device)
        dtype = resolve_dtype(server_args.dtype, config, self.device)
        text_config = config.get_text_config()
        if server_args.load_format == "dummy":
            with self.device:
                model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
        else:
            # The text config picks the LM class; other weights of the checkpoint are skipped.
            model = AutoModelForCausalLM.from_pretrained(
                resolved_model_path(server_args), config=text_config, dtype=dtype,
                local_files_only=True,
            )
        # Never stop early, like cubeserve's ignore_eos (without suppressing EOS as
        # min_new_tokens would, which changes the greedy choices).
        model.generation_config.eos_token_id = None
        self.model = model.to(self.device).eval()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """Seconds to generate exactly ``new_tokens`` greedy tokens per prompt (one left-padded
        batch), and the output ids."""
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
            output = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        self._synchronize()
        return time.perf_counter() - start, output[:, width:].tolist()

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
    """Print ``record`` as one JSON line; with ``--save`` also append it to
    ``<results-dir>/<name>.jsonl``."""
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
