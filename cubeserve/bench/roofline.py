"""The fastest the offline throughput workload can run, given the forwards cubeserve schedules
for it and the peak rates of the device.

``bench.throughput``'s requests (same flags, same seed, so the same lengths) are replayed through
cubeserve's scheduler on the CPU with the built-in tiny demo model: with ``ignore_eos`` and fixed
output lengths the plan of forwards depends only on the lengths and the scheduling limits
(``--chunked-prefill-size``, default the CUDA one; ``--max-running-requests``;
``--max-total-tokens``, default room for everything), never on the model. Each forward of the
model named by ``--model-path`` (only its config is read) is then bounded below by

    max(FLOPs / peak FLOP rate, bytes read / peak bandwidth)

FLOPs: the linear layers for every new token, the LM head for every sampled row, attention for
every (query, key) pair. Bytes: every weight once, and the K and V of every key attended to.
The sum is a bound no kernel can beat; no real forward overlaps compute and memory perfectly.

The peaks are measured on the CUDA device (``--measure-peaks``: a streaming-read kernel and
large cuBLAS GEMMs) or given (``--peak-tflops``, ``--peak-tbps``)::

    python -m cubeserve.bench.roofline --model-path Qwen/Qwen2.5-7B-Instruct --num-prompts 256 \\
        --input-len-range 100 1024 --output-len-range 100 1024 --measure-peaks --save
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from cubeserve.bench.common import add_common_args, bench_model_config, emit, environment
from cubeserve.bench.throughput import add_workload_args, sample_lengths
from cubeserve.demo import ensure_demo_model
from cubeserve.engine.io_struct import TokenizedGenerateReq
from cubeserve.engine.model_runner import ModelRunner, load_model_config
from cubeserve.engine.sampling_params import SamplingParams
from cubeserve.layers.launch import HAS_TRITON
from cubeserve.scheduler.schedule_batch import InflightBatch, ScheduleBatch
from cubeserve.scheduler.scheduler import Scheduler, default_chunked_prefill_size
from cubeserve.server_args import ServerArgs

DATASHEET_PEAKS = {"NVIDIA H100 80GB HBM3": (989e12, 3.35e12)}  # dense bf16 FLOP/s, HBM B/s


class ForwardShape(NamedTuple):
    kind: str  # "prefill", "mixed" (prompt chunks with running requests decoding) or "decode"
    new_tokens: int  # tokens through the linear layers
    sampled_rows: int  # rows through the LM head
    attention_pairs: int  # (query, key) pairs attended
    keys_read: int  # keys whose K and V are read (each request's whole context)

    @classmethod
    def of(cls, batch: ScheduleBatch) -> ForwardShape:
        sampled = sum(
            req.kv_len + n == req.fill_len for req, n in zip(batch.reqs, batch.extend_lens)
        )
        pairs = sum(
            n * req.kv_len + n * (n + 1) // 2 for req, n in zip(batch.reqs, batch.extend_lens)
        )
        keys = sum(req.kv_len + n for req, n in zip(batch.reqs, batch.extend_lens))
        decoding = batch.num_decoding
        kind = "prefill" if not decoding else "decode" if decoding == len(batch.reqs) else "mixed"
        return cls(kind, batch.num_new_tokens, sampled, pairs, keys)


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-token work of a Llama-style decoder (Llama, Qwen2, Qwen3; Quicksviewer's LM)."""

    linear_params: int  # attention projections and MLP of all layers
    lm_head_params: int
    attention_flops_per_pair: int
    kv_bytes_per_key: int
    bytes_per_param: int

    @classmethod
    def from_config(cls, config: PretrainedConfig, bytes_per_param: int = 2) -> ModelCost:
        text = config.get_text_config()
        hidden, layers = text.hidden_size, text.num_hidden_layers
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        per_layer = (
            2 * hidden * heads * head_dim  # q and o
            + 2 * hidden * kv_heads * head_dim  # k and v
            + 3 * hidden * text.intermediate_size  # gate, up, down
        )
        return cls(
            linear_params=layers * per_layer,
            lm_head_params=hidden * text.vocab_size,
            attention_flops_per_pair=layers * heads * head_dim * 4,  # q.k and p.v
            kv_bytes_per_key=layers * 2 * kv_heads * head_dim * bytes_per_param,
            bytes_per_param=bytes_per_param,
        )

    def flops(self, forward: ForwardShape) -> float:
        return (
            2 * self.linear_params * forward.new_tokens
            + 2 * self.lm_head_params * forward.sampled_rows
            + self.attention_flops_per_pair * forward.attention_pairs
        )

    def bytes_read(self, forward: ForwardShape) -> float:
        weights = (self.linear_params + self.lm_head_params) * self.bytes_per_param
        return weights + self.kv_bytes_per_key * forward.keys_read


class Peaks(NamedTuple):
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s


def bound_seconds(forwards: Iterable[ForwardShape], cost: ModelCost, peaks: Peaks) -> float:
    return sum(
        max(cost.flops(f) / peaks.flops, cost.bytes_read(f) / peaks.bandwidth) for f in forwards
    )


# ----------------------------------------------------------------------------- the plan


class _RecordingScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forwards: list[ForwardShape] = []

    def _launch(self, batch: ScheduleBatch) -> InflightBatch | None:
        self.forwards.append(ForwardShape.of(batch))
        return super()._launch(batch)


def plan_forwards(
    server_args: ServerArgs, input_lens: Sequence[int], output_lens: Sequence[int]
) -> list[ForwardShape]:
    """The forwards cubeserve's scheduler issues for these requests, all arriving at once,
    under ``server_args``' scheduling limits (the chunk size defaulting to the CUDA one). The
    prompts are random ids, so that no two share a cached prefix."""
    demo = ensure_demo_model()
    demo_config = load_model_config(demo)
    replay_args = dataclasses.replace(
        server_args,
        model_path=demo,
        tokenizer_path=None,
        load_format="auto",
        dtype="auto",
        device="cpu",
        context_length=max(input_lens) + max(output_lens),
        max_total_tokens=server_args.max_total_tokens or sum(input_lens) + sum(output_lens),
        chunked_prefill_size=server_args.chunked_prefill_size
        or default_chunked_prefill_size(torch.device("cuda")),
        enable_overlap_schedule=False,
        attention_backend=None,
        enable_torch_compile=False,
    )
    scheduler = _RecordingScheduler(replay_args, ModelRunner(replay_args, demo_config))
    rng = random.Random(0)
    vocab = range(demo_config.get_text_config().vocab_size)
    for i, (n_in, n_out) in enumerate(zip(input_lens, output_lens, strict=True)):
        params = SamplingParams(max_new_tokens=n_out, temperature=0.0, ignore_eos=True)
        prompt = rng.choices(vocab, k=n_in)
        scheduler.add_request(TokenizedGenerateReq(f"r{i}", prompt, params.normalize()))
    generated = 0
    while scheduler.has_work:
        generated += sum(len(output.new_token_ids) for output in scheduler.step())
    if generated != sum(output_lens):
        raise RuntimeError(f"the replay generated {generated} tokens, not {sum(output_lens)}")
    return scheduler.forwards


# ----------------------------------------------------------------------------- peak rates


def measure_peaks(device: torch.device) -> Peaks:
    """The best bf16 GEMM rate (cuBLAS, large shapes) and streaming-read bandwidth that
    ``device`` reaches."""
    shapes = ((8192, 8192, 8192), (16384, 8192, 8192), (8192, 4096, 28672))
    peaks = Peaks(max(_gemm_rate(*shape, device) for shape in shapes), _read_rate(device))
    torch.cuda.empty_cache()
    return peaks


def _gemm_rate(m: int, k: int, n: int, device: torch.device) -> float:
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    return 2 * m * k * n / _median_seconds(lambda: F.linear(a, w))


def _read_rate(device: torch.device) -> float:
    """Bytes read per second: by a copy (which also writes as many) and by a reduction."""
    data = torch.empty(4 << 30, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(data)
    rates = [2 * data.numel() / _median_seconds(lambda: target.copy_(data))]
    if HAS_TRITON:
        rates.append(data.numel() / _median_seconds(lambda: _stream_read(data)))
    return max(rates)


def _median_seconds(fn: Callable[[], object], runs: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(X, Out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros((BLOCK,), tl.int32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0, eviction_policy="evict_first")
        tl.store(Out + tl.program_id(0), tl.sum(acc))

    def _stream_read(data: torch.Tensor) -> torch.Tensor:
        words = data.view(torch.int32)
        block, iters = 2048, 16
        out = torch.empty(
            triton.cdiv(words.numel(), block * iters), dtype=torch.int32, device=data.device
        )
        _sum_kernel[(out.numel(),)](
            words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=8
        )
        return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    add_workload_args(parser)
    parser.add_argument("--measure-peaks", action="store_true", help="on the CUDA device")
    parser.add_argument("--peak-tflops", type=float, help="dense FLOP rate, in TFLOP/s")
    parser.add_argument("--peak-tbps", type=float, help="memory bandwidth, in TB/s")
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    config = bench_model_config(server_args)
    input_lens, output_lens = sample_lengths(args)
    forwards = plan_forwards(server_args, input_lens, output_lens)
    cost = ModelCost.from_config(config)

    rates: dict[str, Peaks] = {}
    if args.peak_tflops and args.peak_tbps:
        rates["given"] = Peaks(args.peak_tflops * 1e12, args.peak_tbps * 1e12)
    if args.measure_peaks:
        if not torch.cuda.is_available():
            parser.error("--measure-peaks needs a CUDA device")
        rates["measured"] = measure_peaks(torch.device("cuda"))
        if (datasheet := DATASHEET_PEAKS.get(torch.cuda.get_device_name())) is not None:
            rates["datasheet"] = Peaks(*datasheet)
    if not rates:
        parser.error("give --peak-tflops and --peak-tbps, or --measure-peaks")

    output_tokens = sum(output_lens)
    bounds = {}
    for name, peaks in rates.items():
        seconds = bound_seconds(forwards, cost, peaks)
        bounds[name] = {
            "peak_tflops": round(peaks.flops / 1e12, 1),
            "peak_tbps": round(peaks.bandwidth / 1e12, 3),
            "min_duration_s": float(f"{seconds:.4g}"),
            "max_output_tok_s": round(output_tokens / seconds, 1),
        }
    kinds = collections.Counter(f.kind for f in forwards)
    emit(
        {
            "bench": "roofline",
            "run_name": args.run_name,
            "model": server_args.model_path,
            "num_prompts": args.num_prompts,
            "input_len_range": args.input_len_range,
            "output_len_range": args.output_len_range,
            "output_tokens": output_tokens,
            "forwards": dict(kinds),
            "bounds": bounds,
            "env": environment(),
        },
        "roofline",
        args,
    )


if __name__ == "__main__":
    main()
