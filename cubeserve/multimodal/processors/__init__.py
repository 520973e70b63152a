"""Per-model multimodal processors: chat messages with media -> prompt token ids + media tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from cubeserve.configs.quicksviewer import is_quicksviewer_checkpoint
from cubeserve.server_args import ServerArgs

if TYPE_CHECKING:
    from cubeserve.multimodal.processors.quicksviewer import (
        ProcessedRequest,
        QuicksviewerProcessor,
    )

# (input_ids, mm_inputs) of chat messages; mm_inputs is None when they carry no media.
MessagesProcessor = Callable[[list[dict[str, Any]]], tuple[list[int], Any]]


def create_multimodal_processor(
    server_args: ServerArgs, tokenizer: PreTrainedTokenizerBase
) -> QuicksviewerProcessor | None:
    """The processor of the checkpoint at ``server_args.model_path``; None for text-only models."""
    if not is_quicksviewer_checkpoint(server_args.model_path):
        return None
    from cubeserve.multimodal.processors.quicksviewer import QuicksviewerProcessor

    return QuicksviewerProcessor.from_pretrained(
        server_args.model_path,
        tokenizer=tokenizer,
        conv_template=server_args.chat_template,
        allowed_local_media_path=server_args.allowed_local_media_path,
        media_cache_bytes=server_args.mm_processor_cache_mb << 20,
    )


def engine_inputs(processed: ProcessedRequest) -> tuple[list[int], ProcessedRequest | None]:
    """What the frontend sends the engine: the prompt ids, and the media only if there are any."""
    return processed.input_ids, (processed if processed.media else None)


def create_messages_processor(
    server_args: ServerArgs, tokenizer: PreTrainedTokenizerBase
) -> MessagesProcessor | None:
    """``create_multimodal_processor``'s processor as a ``MessagesProcessor``."""
    processor = create_multimodal_processor(server_args, tokenizer)
    if processor is None:
        return None
    return lambda messages: engine_inputs(processor.process(messages))
