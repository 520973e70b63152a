"""TorchAttentionBackend against naive per-request attention over the full sequences."""

from __future__ import annotations

import math

import pytest
import torch
from model_factory import PagedKV

from cubeserve.attention.base import create_attention_backend
from cubeserve.attention.torch_backend import TorchAttentionBackend
from cubeserve.engine.forward_batch import ForwardMode
from cubeserve.layers.attention import PagedAttention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
LAYER = PagedAttention(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, layer_id=1)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """q: [new, heads, dim] at positions prefix_len..; k, v: [prefix_len + new, kv_heads, dim]."""
    groups = NUM_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(HEAD_DIM)
    query_pos = torch.arange(q.shape[0]).unsqueeze(1) + prefix_len
    scores = scores.masked_fill(torch.arange(k.shape[0]) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).reshape(q.shape[0], -1)


class Sequences:
    """Random q/k/v per request, fed to the backend in steps and remembered for the reference."""

    def __init__(self, kv: PagedKV, num_requests: int, dtype: torch.dtype) -> None:
        self.kv, self.dtype = kv, dtype
        self.rows = [kv.add_request() for _ in range(num_requests)]
        self.keys = [torch.empty(0, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) for _ in self.rows]
        self.values = [torch.empty(0, NUM_KV_HEADS, HEAD_DIM, dtype=dtype) for _ in self.rows]
        self.generator = torch.Generator().manual_seed(0)

    def step(
        self, mode: ForwardMode, new_lens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Run one forward; returns the backend output, the naive output and the batch."""
        batch = self.kv.make_batch(mode, self.rows, [[0] * n for n in new_lens])
        total = sum(new_lens)
        q, k, v = (
            torch.randn(total, heads * HEAD_DIM, generator=self.generator).to(self.dtype)
            for heads in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS)
        )
        out = batch.attn_backend.forward(q, k, v, LAYER, batch)
        expected = []
        for i, (q_i, k_i, v_i) in enumerate(
            zip(q.split(new_lens), k.split(new_lens), v.split(new_lens))
        ):
            prefix_len = self.keys[i].shape[0]
            self.keys[i] = torch.cat([self.keys[i], k_i.view(-1, NUM_KV_HEADS, HEAD_DIM)])
            self.values[i] = torch.cat([self.values[i], v_i.view(-1, NUM_KV_HEADS, HEAD_DIM)])
            q_heads = q_i.view(-1, NUM_HEADS, HEAD_DIM)
            expected.append(naive_attention(q_heads, self.keys[i], self.values[i], prefix_len))
        return out, torch.cat(expected), batch


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_extend_then_extend_over_prefix_then_decode_match_naive_attention(dtype, atol):
    kv = PagedKV((2, NUM_KV_HEADS, HEAD_DIM), dtype, max_context_len=64, num_slots=256)
    seqs = Sequences(kv, num_requests=4, dtype=dtype)

    steps = [
        (ForwardMode.EXTEND, [5, 1, 9, 3]),  # fresh prefill, different lengths
        (ForwardMode.EXTEND, [2, 7, 1, 4]),  # continuation on top of different cached prefixes
        (ForwardMode.DECODE, [1, 1, 1, 1]),
        (ForwardMode.DECODE, [1, 1, 1, 1]),
    ]
    for mode, new_lens in steps:
        out, expected, _ = seqs.step(mode, new_lens)
        assert out.shape == (sum(new_lens), NUM_HEADS * HEAD_DIM)
        torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


def test_new_kv_is_written_at_out_cache_loc_of_the_layer_only():
    kv = PagedKV((2, NUM_KV_HEADS, HEAD_DIM), max_context_len=64, num_slots=256)
    seqs = Sequences(kv, num_requests=2, dtype=torch.float32)

    seqs.step(ForwardMode.EXTEND, [3, 4])
    _, _, batch = seqs.step(ForwardMode.DECODE, [1, 1])

    for i, row in enumerate(seqs.rows):
        slots = kv.req_to_token_pool.req_to_token[row, : kv.seq_lens[row]]
        torch.testing.assert_close(kv.kv_cache.k_buffers[LAYER.layer_id][slots], seqs.keys[i])
        torch.testing.assert_close(kv.kv_cache.v_buffers[LAYER.layer_id][slots], seqs.values[i])
    last_keys = torch.stack([keys[-1] for keys in seqs.keys])
    torch.testing.assert_close(
        kv.kv_cache.k_buffers[LAYER.layer_id][batch.out_cache_loc], last_keys
    )
    assert not kv.kv_cache.k_buffers[0].any(), "another layer's cache was written"
    assert not kv.kv_cache.k_buffers[LAYER.layer_id][0].any(), "padding slot 0 was written"


def test_metadata_masks_causally_and_never_leaves_a_query_row_empty():
    kv = PagedKV((2, NUM_KV_HEADS, HEAD_DIM), max_context_len=64, num_slots=256)
    seqs = Sequences(kv, num_requests=3, dtype=torch.float32)
    seqs.step(ForwardMode.EXTEND, [2, 6, 1])

    batch = kv.make_batch(ForwardMode.EXTEND, seqs.rows, [[0] * 3, [0], [0] * 2])
    meta = batch.attn_metadata

    # Keys visible to each (request, padded query); padded queries repeat the last real row.
    # request 0: prefix 2 + 3 new; request 1: prefix 6 + 1 new; request 2: prefix 1 + 2 new.
    # The one-token request is attended apart, not padded to three queries.
    single, multi = meta.groups
    assert single.mask.shape == (1, 1, 1, 7) and single.mask.all()
    assert single.tokens.tolist() == [3] and single.token_to_padded.tolist() == [0]
    assert multi.mask.shape == (2, 1, 3, 5)
    assert multi.mask.sum(-1).squeeze(1).tolist() == [[3, 4, 5], [2, 3, 3]]
    assert multi.mask[1, 0, 1].tolist() == [True] * 3 + [False] * 2
    assert multi.tokens.tolist() == [0, 1, 2, 4, 5]
    assert multi.token_to_padded.tolist() == [0, 1, 2, 3, 4]


def test_backend_is_registered_as_torch():
    assert isinstance(create_attention_backend("torch"), TorchAttentionBackend)
