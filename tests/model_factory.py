"""Tiny random HF checkpoints and a minimal paged-KV harness for model tests.

Reusable by any test: ``make_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=True)``
writes a checkpoint that both ``transformers`` and ``cubeserve.models.weights.load_model`` read;
``PagedHarness`` runs a cubeserve model over flat EXTEND / DECODE batches the way the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from cubeserve.attention.base import create_attention_backend
from cubeserve.demo import randomize_weights
from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.mem_cache.kv_pool import KVCache, ReqToTokenPool, TokenSlotAllocator
from cubeserve.models.registry import ModelRegistry
from cubeserve.models.weights import load_model

FAMILIES = ("qwen2", "llama", "qwen3")

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_config(
    family: str, *, tie_word_embeddings: bool = False, vocab_size: int = 128, **overrides
) -> PretrainedConfig:
    """A 2-layer GQA config; Llama uses llama3 rope scaling, Qwen3 a head_dim != hidden/heads."""
    kwargs = {**_COMMON, "vocab_size": vocab_size, "tie_word_embeddings": tie_word_embeddings}
    if family == "qwen2":
        config_cls = Qwen2Config
    elif family == "llama":
        config_cls = LlamaConfig
        kwargs.update(
            max_position_embeddings=16384, rope_scaling=LLAMA3_ROPE_SCALING, rope_theta=500000.0
        )
    elif family == "qwen3":
        config_cls = Qwen3Config
        kwargs.update(head_dim=32)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return config_cls(**{**kwargs, **overrides})


def make_tiny_checkpoint(
    path: str | Path,
    family: str = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    sharded: bool = False,
    vocab_size: int = 128,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a random HF checkpoint (config.json + safetensors, sharded with an index if asked)."""
    path = Path(path)
    config = tiny_config(
        family, tie_word_embeddings=tie_word_embeddings, vocab_size=vocab_size, **config_overrides
    )
    model = AutoModelForCausalLM.from_config(config)
    randomize_weights(model, seed)
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "10GB")
    return path


def load_hf_model(path: str | Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_cubeserve_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Module:
    config = AutoConfig.from_pretrained(path)
    model_cls = ModelRegistry.resolve(config.architectures)
    return load_model(model_cls, config, path, dtype, device)


class PagedKV:
    """KV pools plus ForwardBatch construction: a stand-in for the engine's ModelRunner."""

    def __init__(
        self,
        kv_cache_spec: tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        max_requests: int = 16,
        max_context_len: int = 512,
        num_slots: int = 4096,
        attention_backend: str = "torch",
    ) -> None:
        num_layers, num_kv_heads, head_dim = kv_cache_spec
        self.device = torch.device(device)
        self.req_to_token_pool = ReqToTokenPool(max_requests, max_context_len, self.device)
        self.allocator = TokenSlotAllocator(num_slots)
        self.kv_cache = KVCache(num_slots, num_layers, num_kv_heads, head_dim, dtype, self.device)
        self.attn_backend = create_attention_backend(attention_backend)
        self.seq_lens: dict[int, int] = {}

    def add_request(self) -> int:
        row = self.req_to_token_pool.alloc()
        assert row is not None, "out of request rows"
        self.seq_lens[row] = 0
        return row

    def make_batch(
        self,
        mode: ForwardMode,
        rows: Sequence[int],
        chunks: Sequence[Sequence[int]],
        **batch_fields,
    ) -> ForwardBatch:
        """Append ``chunks[i]`` to request ``rows[i]`` (after its cached tokens): allocate KV
        slots, fill the request -> token table and initialise the attention metadata."""
        prefix_lens = [self.seq_lens[row] for row in rows]
        new_lens = [len(chunk) for chunk in chunks]
        slots = self.allocator.alloc(sum(new_lens))
        assert slots is not None, "out of KV slots"
        slots = slots.to(self.device)
        table = self.req_to_token_pool.req_to_token
        for row, start, piece in zip(rows, prefix_lens, slots.split(new_lens)):
            table[row, start : start + len(piece)] = piece
            self.seq_lens[row] = start + len(piece)
        seq_lens_cpu = [self.seq_lens[row] for row in rows]
        positions = [
            pos for start, n in zip(prefix_lens, new_lens) for pos in range(start, start + n)
        ]
        batch = ForwardBatch(
            mode=mode,
            batch_size=len(rows),
            input_ids=self._tensor([t for chunk in chunks for t in chunk]),
            positions=self._tensor(positions),
            req_pool_indices=self._tensor(list(rows)),
            seq_lens=self._tensor(seq_lens_cpu).int(),
            out_cache_loc=slots,
            seq_lens_cpu=seq_lens_cpu,
            extend_prefix_lens_cpu=[] if mode.is_decode else prefix_lens,
            extend_seq_lens_cpu=[] if mode.is_decode else new_lens,
            req_to_token_pool=self.req_to_token_pool,
            kv_cache=self.kv_cache,
            attn_backend=self.attn_backend,
            **batch_fields,
        )
        self.attn_backend.init_forward_metadata(batch)
        return batch

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


class PagedHarness(PagedKV):
    """Runs a cubeserve model over flat EXTEND / DECODE batches the way the engine does."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        param = next(model.parameters())
        super().__init__(model.kv_cache_spec(), param.dtype, param.device, **kwargs)
        self.model = model

    def extend(
        self,
        rows: Sequence[int],
        chunks: Sequence[Sequence[int]],
        input_embeds: torch.Tensor | None = None,
        **batch_fields,
    ) -> torch.Tensor:
        batch = self.make_batch(ForwardMode.EXTEND, rows, chunks, **batch_fields)
        with torch.inference_mode():
            return self.model(batch, input_embeds)

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        batch = self.make_batch(ForwardMode.DECODE, rows, [[t] for t in tokens])
        with torch.inference_mode():
            return self.model(batch)

    def greedy_generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Prefill every prompt in one EXTEND batch, then decode all requests together."""
        rows = [self.add_request() for _ in prompts]
        next_tokens = self.extend(rows, prompts).argmax(-1).tolist()
        outputs = [[t] for t in next_tokens]
        for _ in range(max_new_tokens - 1):
            next_tokens = self.decode(rows, next_tokens).argmax(-1).tolist()
            for out, token in zip(outputs, next_tokens):
                out.append(token)
        return outputs
