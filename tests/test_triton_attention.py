"""Triton paged attention vs. a plain softmax reference and vs. the torch backend.

Without a GPU the kernels run through Triton's interpreter (tiny shapes, fp32/fp16: the
interpreter's bf16 arithmetic is unreliable); on CUDA the same tests add bf16 and the real
model head layouts, and check that decode replays under a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from cubeserve.attention import triton_kernels
from cubeserve.attention.base import create_attention_backend
from cubeserve.attention.triton_backend import (
    MAX_KV_SPLITS,
    MIN_KV_SPLITS,
    TritonAttentionBackend,
    max_kv_splits,
)
from cubeserve.engine.forward_batch import ForwardBatch, ForwardMode
from cubeserve.layers.attention import PagedAttention
from cubeserve.mem_cache.kv_pool import KVCache, ReqToTokenPool, TokenSlotAllocator

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not ON_CUDA and type(triton_kernels._extend_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set; no GPU to compile for",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
# (num_heads, num_kv_heads, head_dim): GQA, MQA with a non power-of-two head_dim, MHA.
HEAD_LAYOUTS = [(4, 2, 16), (3, 1, 24), (2, 2, 32)]
if ON_CUDA:
    HEAD_LAYOUTS += [(28, 4, 128), (16, 2, 80), (8, 1, 96), (8, 8, 64), (4, 2, 256)]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float
) -> torch.Tensor:
    """Causal softmax attention in float64; query i sits at position ``first_pos + i``."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = first_pos + torch.arange(q.shape[0], device=q.device)
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def random_cache(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    shape = (num_slots + 1, num_kv_heads, head_dim)
    return (
        torch.randn(shape, dtype=dtype, device=DEVICE),
        torch.randn(shape, dtype=dtype, device=DEVICE),
    )


# Small key blocks and chunks split these lengths into whole-block chunks, some requests into
# fewer chunks than the scratch holds (129 -> 48 + 48 + 33 of 4).
SMALL_BLOCKS = triton_kernels.DecodeConfig(block_n=16, min_split=16, num_warps=2, num_stages=1)


@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default", "small-blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_decode_kernel_matches_reference(
    layout: tuple[int, int, int],
    dtype: torch.dtype,
    config: triton_kernels.DecodeConfig | None,
) -> None:
    num_heads, num_kv_heads, head_dim = layout
    seq_lens = [1, 63, 200, 129]  # 1 chunk ... several chunks, and a chunk-boundary straddle
    num_slots = sum(seq_lens) + 7
    k_buffer, v_buffer = random_cache(num_slots, num_kv_heads, head_dim, dtype)
    req_to_token = torch.zeros((6, 256), dtype=torch.int64, device=DEVICE)
    slots = (torch.randperm(num_slots, device=DEVICE) + 1)[: sum(seq_lens)].split(seq_lens)
    rows = torch.tensor([4, 0, 5, 2], device=DEVICE)
    for row, row_slots in zip(rows.tolist(), slots):
        req_to_token[row, : len(row_slots)] = row_slots

    batch = len(seq_lens)
    q = torch.randn((batch, num_heads, head_dim), dtype=dtype, device=DEVICE)
    splits = 4
    scratch = triton_kernels.DecodeScratch.allocate(
        batch, num_heads, num_kv_heads, head_dim, splits, torch.device(DEVICE)
    )
    scale = head_dim**-0.5
    # Twice with one scratch, as consecutive layers share it: the chunk counters must be back
    # at zero after each call, or the second call's chunks would never merge.
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        triton_kernels.decode_attention(
            q,
            out,
            k_buffer,
            v_buffer,
            req_to_token,
            rows,
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            scratch,
            scale,
            config,
        )
        assert not scratch.arrivals.any()
        for i, row_slots in enumerate(slots):
            expected = reference_attention(
                q[i : i + 1], k_buffer[row_slots], v_buffer[row_slots], len(row_slots) - 1, scale
            )
            assert_close(out[i : i + 1], expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_extend_kernel_matches_reference(layout: tuple[int, int, int], dtype: torch.dtype) -> None:
    num_heads, num_kv_heads, head_dim = layout
    prefix_lens, extend_lens = [0, 100, 7], [5, 70, 130]  # none, long, short cached prefix
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_slots = sum(seq_lens)
    k_buffer, v_buffer = random_cache(num_slots, num_kv_heads, head_dim, dtype)
    req_to_token = torch.zeros((3, 256), dtype=torch.int64, device=DEVICE)
    slots = (torch.randperm(num_slots, device=DEVICE) + 1).split(seq_lens)
    for row, row_slots in enumerate(slots):
        req_to_token[row, : len(row_slots)] = row_slots

    q = torch.randn((sum(extend_lens), num_heads, head_dim), dtype=dtype, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    starts = [0, extend_lens[0], extend_lens[0] + extend_lens[1]]

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    scale = head_dim**-0.5
    triton_kernels.extend_attention(
        q,
        out,
        k_buffer,
        v_buffer,
        req_to_token,
        torch.arange(3, device=DEVICE),
        int32(prefix_lens),
        int32(extend_lens),
        int32(starts),
        max(extend_lens),
        scale,
    )
    for i, row_slots in enumerate(slots):
        new = slice(starts[i], starts[i] + extend_lens[i])
        expected = reference_attention(
            q[new], k_buffer[row_slots], v_buffer[row_slots], prefix_lens[i], scale
        )
        assert_close(out[new], expected, dtype)


class PagedSetup:
    """A request pool, KV cache and one attention layer, driven like the scheduler does."""

    def __init__(self, layout: tuple[int, int, int], dtype: torch.dtype) -> None:
        num_heads, num_kv_heads, head_dim = layout
        self.layer = PagedAttention(num_heads, head_dim, head_dim**-0.5, num_kv_heads, layer_id=1)
        self.pool = ReqToTokenPool(8, 2048, DEVICE)
        self.allocator = TokenSlotAllocator(4096)
        self.cache = KVCache(4096, 2, num_kv_heads, head_dim, dtype, DEVICE)
        self.dtype = dtype
        self.lens: dict[int, int] = {}  # request row -> tokens in cache

    def new_request(self, shared_prefix_of: int | None = None, prefix_len: int = 0) -> int:
        row = self.pool.alloc()
        if shared_prefix_of is not None:  # a radix-cache hit: reuse another request's slots
            table = self.pool.req_to_token
            table[row, :prefix_len] = table[shared_prefix_of, :prefix_len]
        self.lens[row] = prefix_len
        return row

    def batch(self, mode: ForwardMode, new_tokens: dict[int, int]) -> ForwardBatch:
        rows = list(new_tokens)
        slots = self.allocator.alloc(sum(new_tokens.values())).to(DEVICE)
        offset = 0
        for row, n in new_tokens.items():
            self.pool.req_to_token[row, self.lens[row] : self.lens[row] + n] = slots[
                offset : offset + n
            ]
            self.lens[row] += n
            offset += n
        positions = torch.cat(
            [torch.arange(self.lens[r] - n, self.lens[r]) for r, n in new_tokens.items()]
        )
        seq_lens = [self.lens[r] for r in rows]
        return ForwardBatch(
            mode=mode,
            batch_size=len(rows),
            input_ids=torch.zeros(len(positions), dtype=torch.int64, device=DEVICE),
            positions=positions.to(DEVICE),
            req_pool_indices=torch.tensor(rows, device=DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            out_cache_loc=slots,
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=[s - n for s, n in zip(seq_lens, new_tokens.values())],
            extend_seq_lens_cpu=list(new_tokens.values()),
            req_to_token_pool=self.pool,
            kv_cache=self.cache,
        )

    def qkv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layer
        q_size, kv_size = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        fused = torch.randn((num_tokens, q_size + 2 * kv_size), dtype=self.dtype, device=DEVICE)
        return fused.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as models pass


def run_both_backends(setup: PagedSetup, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = setup.qkv(batch.num_tokens)
    results = []
    for name in ("torch", "triton"):
        backend = create_attention_backend(name)
        batch.attn_backend = backend
        backend.init_forward_metadata(batch)
        results.append(backend.forward(q, k, v, setup.layer, batch))
    return results[0], results[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS[:2] + HEAD_LAYOUTS[3:4])
def test_backend_matches_torch_backend(layout: tuple[int, int, int], dtype: torch.dtype) -> None:
    setup = PagedSetup(layout, dtype)
    first = setup.new_request()
    second = setup.new_request()
    expected, actual = run_both_backends(
        setup, setup.batch(ForwardMode.EXTEND, {first: 90, second: 3})
    )
    assert actual.shape == expected.shape == (93, layout[0] * layout[2])
    assert_close(actual, expected, dtype)

    # A third request reuses 70 cached tokens of the first and extends them by a chunk.
    third = setup.new_request(shared_prefix_of=first, prefix_len=70)
    chunk = setup.batch(ForwardMode.EXTEND, {third: 20, second: 66})
    expected, actual = run_both_backends(setup, chunk)
    assert_close(actual, expected, dtype)

    for _ in range(2):
        step = setup.batch(ForwardMode.DECODE, {first: 1, second: 1, third: 1})
        expected, actual = run_both_backends(setup, step)
        assert actual.shape == (3, layout[0] * layout[2])
        assert_close(actual, expected, dtype)


def test_backend_writes_new_kv_before_attending() -> None:
    setup = PagedSetup((4, 2, 16), torch.float32)
    row = setup.new_request()
    batch = setup.batch(ForwardMode.EXTEND, {row: 5})
    q, k, v = setup.qkv(5)
    backend = TritonAttentionBackend()
    backend.init_forward_metadata(batch)
    out = backend.forward(q, k, v, setup.layer, batch)
    written = setup.cache.k_buffers[1][batch.out_cache_loc]
    assert torch.equal(written, k.reshape(5, 2, 16))
    assert torch.equal(setup.cache.v_buffers[1][batch.out_cache_loc], v.reshape(5, 2, 16))
    # The first token attends only to itself: its output is its own value (per kv group).
    first_values = v[0].view(2, 16).repeat_interleave(2, dim=0)
    torch.testing.assert_close(out[0].view(4, 16), first_values)


def test_decode_ignores_host_lengths() -> None:
    """Decode metadata comes from device tensors only, which CUDA-graph replay requires."""
    setup = PagedSetup((4, 2, 16), torch.float32)
    rows = [setup.new_request(), setup.new_request()]
    extend = setup.batch(ForwardMode.EXTEND, {rows[0]: 80, rows[1]: 9})
    backend = TritonAttentionBackend()
    backend.init_forward_metadata(extend)
    backend.forward(*setup.qkv(89), setup.layer, extend)

    decode = setup.batch(ForwardMode.DECODE, {rows[0]: 1, rows[1]: 1})
    q, k, v = setup.qkv(2)
    backend.init_forward_metadata(decode)
    expected = backend.forward(q, k, v, setup.layer, decode)
    decode.seq_lens_cpu = [1, 1]
    backend.init_forward_metadata(decode)
    torch.testing.assert_close(backend.forward(q, k, v, setup.layer, decode), expected)


def test_max_kv_splits_fills_the_device() -> None:
    assert max_kv_splits(1, 4, 132) == MAX_KV_SPLITS
    assert max_kv_splits(16, 4, 132) == 8
    assert max_kv_splits(3, 2, 16) == 8


def test_max_kv_splits_keeps_splitting_full_batches() -> None:
    assert max_kv_splits(64, 8, 132) == MIN_KV_SPLITS
    assert max_kv_splits(256, 4, 132) == MIN_KV_SPLITS


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_decode_replays_in_cuda_graph() -> None:
    setup = PagedSetup((28, 4, 128), torch.bfloat16)
    rows = [setup.new_request() for _ in range(3)]
    extend = setup.batch(ForwardMode.EXTEND, {rows[0]: 300, rows[1]: 40, rows[2]: 1000})
    backend = TritonAttentionBackend()
    backend.init_forward_metadata(extend)
    backend.forward(*setup.qkv(1340), setup.layer, extend)

    def decode_step(batch: ForwardBatch, q, k, v) -> torch.Tensor:
        backend.init_forward_metadata(batch)
        return backend.forward(q, k, v, setup.layer, batch)

    static = setup.batch(ForwardMode.DECODE, {rows[0]: 1, rows[1]: 1})
    static_qkv = [t.clone() for t in setup.qkv(2)]
    decode_step(static, *static_qkv)  # warm up (compiles the kernels outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_step(static, *static_qkv)

    # Replay for other requests and lengths, then compare with an eager forward.
    fresh = setup.batch(ForwardMode.DECODE, {rows[2]: 1, rows[0]: 1})
    for buf, new in zip(static_qkv, setup.qkv(2)):
        buf.copy_(new)
    static.req_pool_indices.copy_(fresh.req_pool_indices)
    static.seq_lens.copy_(fresh.seq_lens)
    static.out_cache_loc.copy_(fresh.out_cache_loc)
    graph.replay()
    expected = decode_step(fresh, *static_qkv)
    torch.testing.assert_close(static_out, expected)


def test_tiny_model_logits_match_torch_backend(tmp_path) -> None:
    from model_factory import PagedHarness, load_cubeserve_model, make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "qwen3", "qwen3")  # GQA 4/2 heads, head_dim 32
    model = load_cubeserve_model(path, torch.float32, str(DEVICE))
    harnesses = [PagedHarness(model, attention_backend=name) for name in ("torch", "triton")]
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(100, 30, -1))]
    rows = [[h.add_request() for _ in prompts] for h in harnesses]
    expected, actual = (h.extend(r, prompts) for h, r in zip(harnesses, rows))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    for _ in range(3):
        tokens = expected.argmax(-1).tolist()
        expected, actual = (h.decode(r, tokens) for h, r in zip(harnesses, rows))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
