"""TP=2 over gloo on CPU: sharded layers + collectives reproduce the TP=1 logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_factory import PagedHarness, load_cubeserve_model, make_tiny_checkpoint

from cubeserve.distributed import init_tensor_parallel

TP_SIZE = 2
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
# (family, config overrides): KV heads split across ranks; one KV head replicated on both
# ranks with an odd vocabulary (padded last vocab shard) and tied embeddings.
CASES = [
    ("qwen3", {}),
    ("qwen2", {"num_key_value_heads": 1, "vocab_size": 127, "tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
]


def _prefill_then_decode(path: Path) -> torch.Tensor:
    harness = PagedHarness(load_cubeserve_model(path))
    rows = [harness.add_request() for _ in PROMPTS]
    prefill = harness.extend(rows, PROMPTS)
    return torch.cat([prefill, harness.decode(rows, prefill.argmax(-1).tolist())])


def _rank_main(rank: int, init_file: str, paths: list[Path], out_dir: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP_SIZE
    )
    init_tensor_parallel(rank, TP_SIZE)
    try:
        for i, path in enumerate(paths):
            torch.save(_prefill_then_decode(path), out_dir / f"rank{rank}_case{i}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tp")
    return [
        make_tiny_checkpoint(root / f"{family}{i}", family, **overrides)
        for i, (family, overrides) in enumerate(CASES)
    ]


def test_tp2_logits_match_tp1(checkpoints, tmp_path):
    mp.spawn(
        _rank_main,
        args=(str(tmp_path / "init"), checkpoints, tmp_path),
        nprocs=TP_SIZE,
        join=True,
    )

    for i, path in enumerate(checkpoints):
        expected = _prefill_then_decode(path)
        for rank in range(TP_SIZE):
            actual = torch.load(tmp_path / f"rank{rank}_case{i}.pt")
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0, msg=f"{CASES[i]}")
