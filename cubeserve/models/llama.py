"""Llama (2, 3, 3.1 with its rope scaling): the shared decoder with config-driven biases."""

from __future__ import annotations

from transformers import PretrainedConfig

from cubeserve.models.qwen2 import DecoderVariant, Qwen2ForCausalLM


class LlamaForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def decoder_variant(config: PretrainedConfig) -> DecoderVariant:
        attention_bias = getattr(config, "attention_bias", False)
        return DecoderVariant(
            qkv_bias=attention_bias,
            o_proj_bias=attention_bias,
            mlp_bias=getattr(config, "mlp_bias", False),
        )


EntryClass = LlamaForCausalLM
