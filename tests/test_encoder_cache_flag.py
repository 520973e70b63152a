"""``--mm-encoder-cache-mb``: the flag, and the GPU memory it takes from the KV pool's share.

(Its effect on the encode stage and on how media travel: ``test_multimodal_engine.py`` and
``test_media_transport.py``.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cubeserve.cli import build_parser as build_cli_parser
from cubeserve.engine.model_runner import CUDA_ACTIVATION_RESERVE_BYTES, ModelRunner
from cubeserve.launch_server import parse_server_args
from cubeserve.models.quicksviewer import QuicksviewerForCausalLM
from cubeserve.server_args import ServerArgs

GIB = 1 << 30


def test_flag_is_parsed_by_serve_generate_and_the_engine_kwargs() -> None:
    assert parse_server_args([]).mm_encoder_cache_mb == 2048
    assert parse_server_args(["--mm-encoder-cache-mb", "0"]).mm_encoder_cache_mb == 0
    args = build_cli_parser().parse_args(["generate", "hi", "--mm-encoder-cache-mb", "512"])
    assert ServerArgs.from_cli_args(args).mm_encoder_cache_mb == 512
    assert ServerArgs.from_kwargs(mm_encoder_cache_mb=64).mm_encoder_cache_mb == 64
    with pytest.raises(ValueError, match="--mm-encoder-cache-mb must be >= 0"):
        ServerArgs(mm_encoder_cache_mb=-1)
    with pytest.raises(SystemExit):
        parse_server_args(["--mm-encoder-cache-mb", "-5"])


def media_model() -> torch.nn.Module:
    """A Quicksviewer model as far as ``isinstance`` goes (nothing else is needed here)."""
    return QuicksviewerForCausalLM.__new__(QuicksviewerForCausalLM)


@pytest.mark.parametrize(
    ("model", "cache_mb", "free", "expected"),
    [
        # 0.5 of 80 GiB less 10 GiB of weights: 30 GiB, less the encoder cache's 2 GiB.
        (media_model, 2048, 70 * GIB, 28 * GIB),
        (media_model, 0, 70 * GIB, 30 * GIB),
        (lambda: torch.nn.Linear(2, 2), 2048, 70 * GIB, 30 * GIB),  # text-only: no cache
        # Bounded by what is free: 20 GiB less the activation reserve, less the cache.
        (media_model, 2048, 20 * GIB, 20 * GIB - CUDA_ACTIVATION_RESERVE_BYTES - 2 * GIB),
    ],
    ids=["media", "media-cache-off", "text", "media-little-free"],
)
def test_kv_budget_leaves_room_for_the_encoder_cache(
    monkeypatch: pytest.MonkeyPatch, model, cache_mb: int, free: int, expected: int
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * GIB)
    runner = SimpleNamespace(
        server_args=ServerArgs(mem_fraction_static=0.5, mm_encoder_cache_mb=cache_mb),
        model=model(),
        device=torch.device("cuda"),
    )
    assert ModelRunner._cuda_kv_budget_bytes(runner) == expected
