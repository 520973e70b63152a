"""Quicksviewer: SigLIP + cubing + 3D resampler (``QuicksviewerVisionEncoder``) over a Qwen2/Llama LM.

The language model is the ordinary text model of its backbone; visual feature blocks reach it
through ``ForwardBatch.mm_embeds`` / ``mm_mask``, filled by the scheduler's multimodal encode
stage (``cubeserve.multimodal.encode_stage``) before prefill.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from cubeserve.configs.quicksviewer import TEXT_ARCHITECTURES, QuicksviewerConfig
from cubeserve.engine.forward_batch import ForwardBatch
from cubeserve.models.quicksviewer_vision import QuicksviewerVisionEncoder, is_vision_weight
from cubeserve.models.registry import ModelRegistry


class QuicksviewerForCausalLM(nn.Module):
    is_multimodal = True

    def __init__(self, config: QuicksviewerConfig) -> None:
        super().__init__()
        self.config = config
        text_config = config.text_config
        architectures = text_config.architectures or [TEXT_ARCHITECTURES[text_config.model_type]]
        self.language_model = ModelRegistry.resolve(architectures)(text_config)
        self.vision = QuicksviewerVisionEncoder(config)

    def forward(self, batch: ForwardBatch, input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(batch, input_embeds)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Original (``model.vision_tower...``) or converted names; LM tensors stream through."""
        vision_weights: list[tuple[str, torch.Tensor]] = []

        def language_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if is_vision_weight(name):
                    vision_weights.append((name, tensor))
                else:
                    yield name, tensor

        self.language_model.load_weights(language_weights())
        self.vision.load_weights(vision_weights)


EntryClass = QuicksviewerForCausalLM
