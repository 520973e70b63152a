"""Qwen3 (dense): the shared decoder with per-head q/k RMSNorm and no qkv bias."""

from __future__ import annotations

from transformers import PretrainedConfig

from cubeserve.models.qwen2 import DecoderVariant, Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def decoder_variant(config: PretrainedConfig) -> DecoderVariant:
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderVariant(qkv_bias=attention_bias, o_proj_bias=attention_bias, qk_norm=True)


EntryClass = Qwen3ForCausalLM
