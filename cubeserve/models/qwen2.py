"""Qwen2 and the decoder shared by the Llama-family models (Llama, Qwen3).

The families differ only in which projections carry a bias and whether q/k are RMS-normalised
per head; ``DecoderVariant`` carries those flags from each ``*ForCausalLM`` down to the layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from cubeserve.engine.forward_batch import ForwardBatch
from cubeserve.layers.attention import PagedAttention
from cubeserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cubeserve.layers.fused_kernels import rotary_emb
from cubeserve.layers.layernorm import RMSNorm
from cubeserve.layers.linear import GateUpParallelLinear, QKVParallelLinear, RowParallelLinear
from cubeserve.layers.rotary import RotaryEmbedding
from cubeserve.models.weights import StackedWeight, load_named_weights

STACKED_WEIGHTS = (
    StackedWeight("qkv_proj", "q_proj", "q"),
    StackedWeight("qkv_proj", "k_proj", "k"),
    StackedWeight("qkv_proj", "v_proj", "v"),
    StackedWeight("gate_up_proj", "gate_proj", 0),
    StackedWeight("gate_up_proj", "up_proj", 1),
)

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecoderVariant:
    qkv_bias: bool
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, variant: DecoderVariant) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=variant.qkv_bias
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=variant.o_proj_bias
        )
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = variant.qk_norm
        self.attn = PagedAttention(
            self.qkv_proj.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.qkv_proj.num_kv_heads,
            layer_id,
        )

    def forward(self, hidden: torch.Tensor, cos_sin: CosSin, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.qk_norm:
            q = self._norm_per_head(self.q_norm, q)
            k = self._norm_per_head(self.k_norm, k)
        q, k = rotary_emb(q, k, *cos_sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v, batch))

    def _norm_per_head(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.reshape(-1, self.head_dim)).view(x.shape)


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, variant: DecoderVariant) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(
                f"hidden_act {config.hidden_act!r} is not supported (only silu)"
            )
        size = config.intermediate_size
        self.gate_up_proj = GateUpParallelLinear(config.hidden_size, size, bias=variant.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=variant.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, variant: DecoderVariant) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_id, variant)
        self.mlp = DecoderMLP(config, variant)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: CosSin,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP output and the residual stream it still has to be added to."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, variant: DecoderVariant) -> None:
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not supported")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer_id, variant) for layer_id in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        if batch.mm_mask is None:
            return self.embed_tokens(batch.input_ids)
        # Multimodal placeholder ids may lie outside the vocabulary.
        return self.embed_tokens(batch.input_ids.masked_fill(batch.mm_mask, 0))

    def forward(
        self, batch: ForwardBatch, input_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.embed(batch) if input_embeds is None else input_embeds
        if batch.mm_mask is not None:
            hidden = hidden.masked_scatter(
                batch.mm_mask.unsqueeze(-1), batch.mm_embeds.to(hidden.dtype)
            )
        cos_sin = self.rotary_emb(batch.positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos_sin, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.decoder_variant(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def decoder_variant(config: PretrainedConfig) -> DecoderVariant:
        return DecoderVariant(qkv_bias=True)

    def forward(
        self, batch: ForwardBatch, input_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 logits [batch_size, vocab] of each request's last new token."""
        hidden = self.model(batch, input_embeds)
        return self.lm_head(hidden[batch.last_token_indices()])

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads on this rank, head_dim)."""
        attn = self.model.layers[0].self_attn.attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.config.tie_word_embeddings
        load_named_weights(
            self,
            weights,
            STACKED_WEIGHTS,
            skip=lambda name: "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"),
        )


EntryClass = Qwen2ForCausalLM
