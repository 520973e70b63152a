"""CUDA-graph decode: replayed logits equal eager ones, padding never leaks into real requests."""

from __future__ import annotations

import pytest
import torch

from cubeserve.engine.cuda_graph_runner import capture_batch_sizes
from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(1) == [1]


def make_runner(tmp_path, dtype: str = "bfloat16"):
    from model_factory import make_tiny_checkpoint
    from transformers import AutoConfig

    from cubeserve.engine.model_runner import ModelRunner
    from cubeserve.server_args import ServerArgs

    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    args = ServerArgs(
        model_path=str(path),
        device="cuda",
        dtype=dtype,
        attention_backend="triton",
        max_total_tokens=4096,
        max_running_requests=16,
        cuda_graph_max_bs=16,
    )
    return ModelRunner(args, AutoConfig.from_pretrained(path))


def make_batch(
    runner, lens: dict[int, int], mode: ForwardMode, rows: list[int], new_lens: list[int]
) -> ForwardBatch:
    """A batch appending ``new_lens`` tokens (ids from torch's global generator) to ``rows``,
    whose current lengths ``lens`` tracks."""
    slots = runner.token_allocator.alloc(sum(new_lens)).cuda()
    positions = []
    for row, piece in zip(rows, slots.split(new_lens)):
        start = lens.get(row, 0)
        runner.req_to_token_pool.req_to_token[row, start : start + len(piece)] = piece
        positions += range(start, start + len(piece))
        lens[row] = start + len(piece)
    seq_lens = [lens[row] for row in rows]
    return ForwardBatch(
        mode=mode,
        batch_size=len(rows),
        input_ids=torch.randint(0, 128, (sum(new_lens),), device="cuda"),
        positions=torch.tensor(positions, device="cuda"),
        req_pool_indices=torch.tensor(rows, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        out_cache_loc=slots,
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=[s - n for s, n in zip(seq_lens, new_lens)],
        extend_seq_lens_cpu=new_lens,
        req_to_token_pool=runner.req_to_token_pool,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_decode_matches_eager(tmp_path) -> None:
    pytest.importorskip("triton")
    runner = make_runner(tmp_path)
    graphs = runner.cuda_graph_runner
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 16]
    lens: dict[int, int] = {}

    def eager(batch: ForwardBatch) -> torch.Tensor:
        with torch.inference_mode():
            runner.attn_backend.init_forward_metadata(batch)
            return runner.model.forward(batch)

    rows = [runner.req_to_token_pool.alloc() for _ in range(6)]
    runner.forward(make_batch(runner, lens, ForwardMode.EXTEND, rows, [5, 70, 1, 300, 9, 33]))
    # 6 pads to 8, then a smaller batch must not see the padding rows left over from it.
    for step_rows in (rows, rows[1:4], rows[:1]):
        batch = make_batch(runner, lens, ForwardMode.DECODE, step_rows, [1] * len(step_rows))
        assert graphs.can_run(batch)
        replayed = runner.forward(batch).clone()
        assert replayed.shape == (len(step_rows), 128)
        # Padded batches may split the KV differently: allow bf16 rounding, nothing more.
        torch.testing.assert_close(replayed, eager(batch), rtol=1e-2, atol=1e-2)

    # The extend path is never replayed.
    assert not graphs.can_run(make_batch(runner, lens, ForwardMode.EXTEND, rows[:1], [4]))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs compute capability 9",
)
def test_pdl_launches_give_the_plain_launches_logits(tmp_path, monkeypatch) -> None:
    """Graphs captured with programmatic dependent launch compute exactly what plain launches
    do: a kernel that read its inputs before the previous one finished would change logits."""
    pytest.importorskip("triton")
    from cubeserve.layers import launch

    def decode_logits(pdl: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(launch, "pdl_enabled", pdl)
        torch.manual_seed(0)
        runner = make_runner(tmp_path / str(pdl))
        lens: dict[int, int] = {}
        rows = [runner.req_to_token_pool.alloc() for _ in range(3)]
        runner.forward(make_batch(runner, lens, ForwardMode.EXTEND, rows, [40, 7, 300]))
        logits = []
        for step_rows in [rows[:1]] * 8 + [rows] * 8:
            batch = make_batch(runner, lens, ForwardMode.DECODE, step_rows, [1] * len(step_rows))
            logits.append(runner.forward(batch).clone())
        return logits

    with_pdl, plain = decode_logits(True), decode_logits(False)
    for a, b in zip(with_pdl, plain):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_overlap_schedule_with_graphs_matches_the_synchronous_schedule(tmp_path) -> None:
    """On the device the overlap schedule really runs ahead of the host: inputs come from the
    previous forward's sampled tokens inside graph replays. Greedy fp32 tokens must not change."""
    pytest.importorskip("triton")
    from model_factory import make_tiny_checkpoint
    from transformers import AutoConfig

    from cubeserve.engine.io_struct import TokenizedGenerateReq
    from cubeserve.engine.model_runner import ModelRunner
    from cubeserve.engine.sampling_params import SamplingParams
    from cubeserve.scheduler.scheduler import Scheduler
    from cubeserve.server_args import ServerArgs

    path = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=generator).tolist() for n in (5, 33, 12, 70)]

    def run(overlap: bool) -> dict[str, list[int]]:
        args = ServerArgs(
            model_path=str(path),
            device="cuda",
            dtype="float32",
            max_total_tokens=4096,
            max_running_requests=8,
            cuda_graph_max_bs=8,
            enable_overlap_schedule=overlap,
        )
        scheduler = Scheduler(args, ModelRunner(args, AutoConfig.from_pretrained(path)))
        params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True).normalize()
        for i, ids in enumerate(prompts):
            scheduler.add_request(TokenizedGenerateReq(str(i), ids, params))
        outputs: dict[str, list[int]] = {}
        while scheduler.has_work:
            for out in scheduler.step():
                outputs.setdefault(out.rid, []).extend(out.new_token_ids)
        return outputs

    overlapped = run(overlap=True)
    assert overlapped == run(overlap=False)
    assert all(len(ids) == 40 for ids in overlapped.values())
