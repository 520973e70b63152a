"""Offline throughput: cubeserve's ``Engine`` against HF transformers ``generate``.

    python -m cubeserve.bench.offline [--model-path DIR] [--num-prompts 16 --input-len 32 --output-len 32]

Both sides get the same random prompts (exactly ``--input-len`` token ids each, so no padding
is ever needed) and the same weights, decode greedily and ignore EOS, so each prompt yields
exactly ``--output-len`` tokens. HF runs all prompts as ONE batched ``generate`` call;
cubeserve receives them as one batch and schedules them itself. Start-up and weight loading
are excluded, each side is warmed up first, and the two run one after the other so they
never share the machine. Prints one JSON line; ``greedy_outputs_match`` is the share of
prompts whose tokens agree exactly (expect 1.0 in float32; low precision may drift).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from cubeserve.engine.engine import Engine
from cubeserve.engine.model_runner import resolve_device
from cubeserve.server_args import ServerArgs

WARMUP_TOKENS = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cubeserve.bench.offline", description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def random_prompts(vocab_size: int, excluded: set[int], num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    candidates = [token for token in range(vocab_size) if token not in excluded]
    return [rng.choices(candidates, k=length) for _ in range(num)]


def run_cubeserve(engine: Engine, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    """Seconds for the whole batch, and each prompt's output ids."""
    params = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    engine.generate(input_ids=prompts[:1], sampling_params={**params, "max_new_tokens": WARMUP_TOKENS})
    engine.flush_cache()  # no prefix-cache hit from the warm-up
    start = time.perf_counter()
    outputs = engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - start, [output["output_ids"] for output in outputs]


def run_hf(
    model_path: str, prompts: list[list[int]], output_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[float, list[list[int]]]:
    """Seconds for one batched greedy ``generate`` call, and each prompt's output ids."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True).to(device).eval()
    # Never stop early, like cubeserve's ignore_eos (a None in the call's config would fall back to this one).
    model.generation_config.eos_token_id = None
    input_ids = torch.tensor(prompts, device=device)
    attention_mask = torch.ones_like(input_ids)

    def generate(num_prompts: int, new_tokens: int) -> torch.Tensor:
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
        return model.generate(
            input_ids[:num_prompts], attention_mask=attention_mask[:num_prompts], generation_config=config
        )

    generate(1, WARMUP_TOKENS)
    _synchronize(device)
    start = time.perf_counter()
    output = generate(len(prompts), output_len)
    _synchronize(device)
    return time.perf_counter() - start, output[:, input_ids.shape[1] :].tolist()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    engine_kwargs = {k: v for k, v in vars(server_args).items() if k != "extra"}
    with Engine(**engine_kwargs) as engine:
        info = engine.tokenizer_manager.info
        excluded = set(engine.tokenizer.all_special_ids)
        prompts = random_prompts(len(engine.tokenizer), excluded, args.num_prompts, args.input_len, args.seed)
        cubeserve_s, cubeserve_ids = run_cubeserve(engine, prompts, args.output_len)
    device = resolve_device(server_args.device)
    hf_s, hf_ids = run_hf(info.model_path, prompts, args.output_len, device, getattr(torch, info.dtype))

    output_tokens = args.num_prompts * args.output_len
    result = {
        "bench": "offline",
        "device": _device_name(device),
        "dtype": info.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "cubeserve_output_tok_s": round(output_tokens / cubeserve_s, 1),
        "hf_output_tok_s": round(output_tokens / hf_s, 1),
        "speedup": round(hf_s / cubeserve_s, 2),
        "greedy_outputs_match": sum(a == b for a, b in zip(cubeserve_ids, hf_ids)) / args.num_prompts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
