"""All launch options, named after SGLang's ``launch_server`` flags.

``ServerArgs`` is shared by the CLI, the HTTP server and the offline ``Engine`` (which takes
the same options as keyword arguments: ``Engine(model_path=..., max_total_tokens=4096)``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

SCHEDULE_POLICIES = ("fcfs", "lpm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass
class ServerArgs:
    model_path: str | None = None  # None: the built-in tiny demo model
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    max_queued_requests: int = 1024
    chunked_prefill_size: int | None = None  # None: 8192 on CUDA, 2048 on CPU
    # Running requests decode inside prefill forwards (SGLang's mixed chunked prefill). On by
    # default, unlike SGLang: a long video's prompt spans many chunks, and prefill-only
    # forwards would stall every running stream for all of them.
    enable_mixed_chunk: bool = True
    schedule_policy: str = "fcfs"
    enable_overlap_schedule: bool | None = None  # None: on for CUDA, off on CPU
    attention_backend: str | None = None
    tp_size: int = 1
    enable_torch_compile: bool = False
    disable_radix_cache: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256
    random_seed: int = 0
    allowed_local_media_path: str | None = None
    mm_processor_cache_mb: int = 4096  # decoded media kept by the frontend; 0 disables
    # Vision encodings kept by the engine on the model's device, within --mem-fraction-static
    # (the KV pool gets that much less); 0 disables, and media then always travel as pixels.
    mm_encoder_cache_mb: int = 2048
    # Frames per vision-tower call: also what the engine encodes per step while others decode.
    vision_batch_size: int = 64
    max_request_bytes: int = 64 * 1024 * 1024
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"--schedule-policy must be one of {SCHEDULE_POLICIES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"--load-format must be one of {LOAD_FORMATS}")
        if self.tp_size != 1:
            raise NotImplementedError(
                "--tp-size > 1 is not implemented yet: layers are TP-aware, multi-GPU launch is not"
            )
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < 1:
            raise ValueError("--chunked-prefill-size must be >= 1")
        if self.mm_processor_cache_mb < 0:
            raise ValueError("--mm-processor-cache-mb must be >= 0")
        if self.mm_encoder_cache_mb < 0:
            raise ValueError("--mm-encoder-cache-mb must be >= 0")
        if self.vision_batch_size < 1:
            raise ValueError("--vision-batch-size must be >= 1")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1)")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--model-path", "--model", dest="model_path", default=None,
            help="checkpoint dir (HF or Quicksviewer format); default: built-in demo model")
        add("--tokenizer-path", default=None)
        add("--served-model-name", default=None)
        add("--chat-template", default=None, help="jinja file or built-in name")
        add("--load-format", default="auto", choices=LOAD_FORMATS)
        add("--dtype", default="auto", choices=DTYPES)
        add("--device", default="auto", help="cpu, cuda or auto")
        add("--context-length", type=int, default=None)
        add("--host", default="127.0.0.1")
        add("--port", type=int, default=30000)
        add("--api-key", default=None)
        add("--mem-fraction-static", type=float, default=None)
        add("--max-total-tokens", type=int, default=None)
        add("--max-running-requests", type=int, default=None)
        add("--max-queued-requests", type=int, default=1024)
        add("--chunked-prefill-size", type=int, default=None,
            help="most prompt tokens per forward (default: 8192 on CUDA, 2048 on CPU)")
        add("--enable-mixed-chunk", action="store_true", default=True,
            help="decode running requests in the same forward as prompt chunks (default)")
        add("--disable-mixed-chunk", dest="enable_mixed_chunk", action="store_false",
            help="prefill-only forwards: running requests wait while prompts are prefilled")
        add("--schedule-policy", default="fcfs", choices=SCHEDULE_POLICIES)
        add("--enable-overlap-schedule", action="store_true", default=None,
            help="launch each forward before processing the previous one's tokens "
            "(default on CUDA)")
        add("--disable-overlap-schedule", dest="enable_overlap_schedule", action="store_false",
            help="process each forward's tokens before scheduling the next (default on CPU)")
        add("--attention-backend", default=None, help="torch or triton (default: triton on CUDA)")
        add("--tp-size", "--tp", dest="tp_size", type=int, default=1)
        add("--enable-torch-compile", action="store_true")
        add("--disable-radix-cache", action="store_true")
        add("--disable-cuda-graph", action="store_true")
        add("--cuda-graph-max-bs", type=int, default=256)
        add("--random-seed", type=int, default=0)
        add("--allowed-local-media-path", default=None)
        add("--mm-processor-cache-mb", type=int, default=4096,
            help="decoded videos/images kept for repeat requests (MiB); 0 disables")
        add("--mm-encoder-cache-mb", type=int, default=2048,
            help="vision encodings kept on the GPU for repeat requests (MiB, taken from "
            "--mem-fraction-static's share); 0 disables")
        add("--vision-batch-size", type=int, default=64,
            help="frames per vision-tower call, and per scheduler step while other requests "
            "decode: smaller keeps their token gaps shorter, larger encodes a video faster")
        add("--max-request-bytes", type=int, default=64 * 1024 * 1024)
        add("--log-level", default="info")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown server args: {sorted(unknown)}")
        return cls(**kwargs)
