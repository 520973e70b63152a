"""Owns the model and its KV memory: device/dtype choice, weight loading, pool sizing, forward.

The scheduler hands it flat ``ForwardBatch``es; decode batches go through the CUDA graph
runner when it can replay them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, PretrainedConfig

from cubeserve.attention.base import AttentionBackend, create_attention_backend
from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.engine.sampler import PendingSample, Sampler, SamplingReq
from cubeserve.layers.fused_kernels import enable_torch_compile
from cubeserve.mem_cache.kv_pool import (
    PADDING_ROW,
    PADDING_SLOT,
    KVCache,
    ReqToTokenPool,
    TokenSlotAllocator,
)
from cubeserve.models.registry import ModelRegistry
from cubeserve.models.weights import load_model
from cubeserve.server_args import ServerArgs

if TYPE_CHECKING:
    from cubeserve.engine.cuda_graph_runner import CudaGraphRunner

logger = logging.getLogger(__name__)

DEFAULT_MEM_FRACTION_STATIC = 0.85
# GPU memory kept out of the KV pool for activations, the sampler and CUDA graphs.
CUDA_ACTIVATION_RESERVE_BYTES = 1 << 30
# On CPU the KV pool may take this share of the free RAM, and at most this many full contexts.
CPU_KV_RAM_FRACTION = 0.25
CPU_KV_MAX_CONTEXTS = 4
DEFAULT_MAX_RUNNING_REQUESTS = 256
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model_config(model_path: str | Path) -> PretrainedConfig:
    """The checkpoint's config; Quicksviewer checkpoints (original or converted) included."""
    from cubeserve.configs.quicksviewer import is_quicksviewer_checkpoint, load_quicksviewer_config

    if is_quicksviewer_checkpoint(model_path):
        return load_quicksviewer_config(model_path)
    return AutoConfig.from_pretrained(str(model_path), local_files_only=True)


class ModelRunner:
    def __init__(self, server_args: ServerArgs, model_config: PretrainedConfig) -> None:
        self.server_args = server_args
        self.model_config = model_config
        text_config = model_config.get_text_config()
        self.vocab_size: int = text_config.vocab_size
        self.device = resolve_device(server_args.device)
        self.dtype = resolve_dtype(server_args.dtype, model_config, self.device)
        if self.dtype == torch.float32:
            # cuDNN runs fp32 convolutions (SigLIP's patch embedding) in TF32 by default: that
            # alone moved the vision features by ~7e-4 on H100. float32 must mean float32.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        torch.manual_seed(server_args.random_seed)

        model_cls = ModelRegistry.resolve(model_config.architectures or [])
        self.model = load_model(
            model_cls,
            model_config,
            server_args.model_path,
            self.dtype,
            self.device,
            server_args.load_format,
        )
        num_layers, num_kv_heads, head_dim = self.model.kv_cache_spec()
        bytes_per_token = KVCache.bytes_per_token(num_layers, num_kv_heads, head_dim, self.dtype)
        model_context_len = server_args.context_length or text_config.max_position_embeddings
        self.max_total_tokens = self._kv_capacity(bytes_per_token, model_context_len)
        # A request can never hold more KV than the whole pool.
        self.context_len = min(model_context_len, self.max_total_tokens)
        self.max_running_requests = server_args.max_running_requests or min(
            DEFAULT_MAX_RUNNING_REQUESTS, max(1, self.max_total_tokens // 2)
        )

        self.req_to_token_pool = ReqToTokenPool(
            self.max_running_requests, self.context_len, self.device
        )
        self.token_allocator = TokenSlotAllocator(self.max_total_tokens)
        self.kv_cache = KVCache(
            self.max_total_tokens, num_layers, num_kv_heads, head_dim, self.dtype, self.device
        )
        self.attn_backend: AttentionBackend = create_attention_backend(
            server_args.attention_backend or default_attention_backend(self.device)
        )
        self.sampler = Sampler()
        if server_args.enable_torch_compile:
            enable_torch_compile()
        self.cuda_graph_runner = self._init_cuda_graphs()
        self._warm_up_prefill()
        logger.info(
            "model %s on %s (%s): KV pool %d tokens, context %d, max running requests %d",
            model_cls.__name__,
            self.device,
            self.dtype,
            self.max_total_tokens,
            self.context_len,
            self.max_running_requests,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits ``[batch_size, vocab]`` of each request's last new token."""
        batch.kv_cache = self.kv_cache
        batch.attn_backend = self.attn_backend
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        self.attn_backend.init_forward_metadata(batch)
        return self.model.forward(batch)

    def sample_async(self, logits: torch.Tensor, reqs: Sequence[SamplingReq]) -> PendingSample:
        return self.sampler.sample_async(logits, reqs)

    def _kv_capacity(self, bytes_per_token: int, context_len: int) -> int:
        """KV pool size in tokens: ``--max-total-tokens``, else what the memory allows."""
        if self.server_args.max_total_tokens is not None:
            return self.server_args.max_total_tokens
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget_bytes()
        else:
            budget = min(
                _free_ram_bytes() * CPU_KV_RAM_FRACTION,
                CPU_KV_MAX_CONTEXTS * context_len * bytes_per_token,
            )
        tokens = int(budget // bytes_per_token)
        if tokens < 1:
            raise RuntimeError(
                f"no {self.device} memory left for the KV cache ({budget / 2**30:.2f} GiB after "
                "the weights, the activation reserve and the vision encoder cache; is another "
                "process using it?): raise --mem-fraction-static, lower --mm-encoder-cache-mb "
                "or set --max-total-tokens"
            )
        return tokens

    def _cuda_kv_budget_bytes(self) -> float:
        """``--mem-fraction-static`` of the GPU for weights + KV + the vision encoder cache
        (``--mm-encoder-cache-mb``, models that accept media), bounded by what is free now."""
        from cubeserve.multimodal.encode_stage import encoder_cache_bytes

        fraction = self.server_args.mem_fraction_static or DEFAULT_MEM_FRACTION_STATIC
        free, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        encoder_cache = encoder_cache_bytes(self.server_args, self.model)
        return min(total * fraction - weights, free - CUDA_ACTIVATION_RESERVE_BYTES) - encoder_cache

    @torch.inference_mode()
    def _warm_up_prefill(self, max_tokens: int = 16) -> None:
        """Run one dummy prompt forward, so that the prefill path's kernels (Triton's extend
        attention above all: ~1 s to compile on an H100) compile at start-up rather than inside
        the first requests; decode's compile while CUDA graphs are captured. Its tokens read and
        write only the padding slot."""
        num_tokens = min(max_tokens, self.context_len)
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            batch_size=1,
            input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
            positions=torch.arange(num_tokens, dtype=torch.int64, device=self.device),
            req_pool_indices=torch.tensor([PADDING_ROW], dtype=torch.int64, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            out_cache_loc=torch.full(
                (num_tokens,), PADDING_SLOT, dtype=torch.int64, device=self.device
            ),
            seq_lens_cpu=[num_tokens],
            extend_prefix_lens_cpu=[0],
            extend_seq_lens_cpu=[num_tokens],
            req_to_token_pool=self.req_to_token_pool,
        )
        self.forward(batch)

    def _init_cuda_graphs(self) -> CudaGraphRunner | None:
        if not use_cuda_graphs(self.device, self.server_args, self.attn_backend):
            return None
        from cubeserve.engine.cuda_graph_runner import CudaGraphRunner

        return CudaGraphRunner(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, model_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on CUDA (bfloat16 if it names none), float32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    configured = checkpoint_dtype(model_config.get_text_config()) or checkpoint_dtype(model_config)
    if configured is None:
        return torch.bfloat16
    return getattr(torch, configured) if isinstance(configured, str) else configured


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | str | None:
    """The dtype a config names: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def use_cuda_graphs(
    device: torch.device, server_args: ServerArgs, attn_backend: AttentionBackend
) -> bool:
    """Whether to capture decode in CUDA graphs: on CUDA, unless disabled or the attention
    backend cannot be captured (then decode runs eagerly, with a warning)."""
    if device.type != "cuda" or server_args.disable_cuda_graph:
        return False
    if not attn_backend.supports_cuda_graph:
        logger.warning(
            "attention backend %s cannot be captured in CUDA graphs: decode runs eagerly "
            "(use --attention-backend triton, or --disable-cuda-graph to silence this)",
            type(attn_backend).__name__,
        )
        return False
    return True


def default_attention_backend(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def _free_ram_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
