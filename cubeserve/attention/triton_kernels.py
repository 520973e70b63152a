"""Triton paged-attention kernels over cubeserve's KV layout (page size 1).

Layer K/V live in ``k_buffer[slot, kv_head, :]``; request ``r``'s slots are
``req_to_token[r, :seq_len]``. Both kernels read every key through that table (in the shared
online-softmax loop ``_attend_keys``), so a cached prefix and the tokens written by this forward
are read alike.

Decode is flash-decoding in one kernel: ``_decode_kernel`` splits each request's context into up
to ``max_kv_splits`` chunks, one program per (request, kv head, chunk) serving all q heads of
the group with one ``tl.dot``. A request of one chunk writes its output directly; otherwise the
chunks store partial results and the program that finishes last (counted by an atomic) combines
them by their log-sum-exp, so no second kernel is launched. The number of chunks of a request
is derived from its length inside the kernel, so decode needs no per-forward host metadata and
replays under CUDA graphs.

With ``TRITON_INTERPRET=1`` set before triton is imported, the kernels run on CPU tensors
through Triton's interpreter (slow; for tests). The interpreter's bfloat16 arithmetic is
unreliable, so CPU callers should use fp16 or fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cubeserve.layers.launch import allow_dependents, supports_pdl

# A request gets one more decode chunk per this many tokens (up to the max_kv_splits cap).
MIN_TOKENS_PER_SPLIT = 64
LOG2_E = 1.4426950408889634  # kernels use exp2; scores are pre-scaled by log2(e)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches (CPU debugging, tests) keep full precision; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attend_keys(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    token_row,
    K_Buffer,
    V_Buffer,
    kv_head,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    sm_scale_log2,
    kv_start,
    kv_end,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax attention of the rows of ``q`` over keys ``kv_start..kv_end`` of one
    request (read through its ``req_to_token`` row); with ``CAUSAL`` row i sees keys <= q_pos[i].
    Scores are in log2 units (``sm_scale_log2`` folds in log2(e))."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start_n in range(kv_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(token_row + offs_n, mask=mask_n, other=0)
        k = tl.load(
            K_Buffer + slots[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale_log2
        if CAUSAL:
            scores = tl.where(
                (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :], scores, float("-inf")
            )
        else:
            scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_Buffer + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_len(seq_len, max_kv_splits, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per decode chunk of a request: its context over at most ``max_kv_splits`` chunks
    of at least ``MIN_SPLIT`` tokens, rounded up to whole key blocks so that only a request's
    last block is partial."""
    num_splits = tl.minimum(tl.cdiv(seq_len, MIN_SPLIT), max_kv_splits)
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_kernel(
    Q,
    K_Buffer,
    V_Buffer,
    Req_To_Token,
    Req_Pool_Indices,
    Seq_Lens,
    Out,
    Partial_Out,
    Partial_Lse,
    Arrivals,
    sm_scale_log2,
    num_heads,
    num_kv_heads,
    max_kv_splits,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_req,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    allow_dependents(PDL)
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(Seq_Lens + batch)
    split_len = _split_len(seq_len, max_kv_splits, MIN_SPLIT, BLOCK_N)
    num_splits = tl.cdiv(seq_len, split_len)
    kv_start = split * split_len
    kv_end = tl.minimum(kv_start + split_len, seq_len)
    if kv_start >= kv_end:
        return

    offs_g = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_g
    mask_h = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_hd = mask_h[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        Q + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_hd,
        other=0.0,
    )

    token_row = Req_To_Token + tl.load(Req_Pool_Indices + batch) * stride_req
    acc, l_i, m_i = _attend_keys(
        tl.zeros([BLOCK_H, BLOCK_D], tl.float32),
        tl.zeros([BLOCK_H], tl.float32),
        tl.full([BLOCK_H], float("-inf"), tl.float32),
        q,
        None,
        token_row,
        K_Buffer,
        V_Buffer,
        kv_head,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        sm_scale_log2,
        kv_start,
        kv_end,
        CAUSAL=False,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=DOT_PRECISION,
    )

    out_ptrs = Out + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if num_splits == 1:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask_hd)
        return

    first_rows = (batch * num_heads + heads) * max_kv_splits
    tl.store(
        Partial_Out + (first_rows + split)[:, None] * HEAD_DIM + offs_d[None, :],
        acc / l_i[:, None],
        mask=mask_hd,
    )
    tl.store(Partial_Lse + first_rows + split, m_i + tl.log2(l_i), mask=mask_h)
    # The chunk that finishes last merges them all. The barrier puts every thread's stores
    # before the counter's release; the acquire makes the other chunks' stores visible here.
    tl.debug_barrier()
    counter = Arrivals + batch * num_kv_heads + kv_head
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        tl.store(counter, 0)  # ready for the next layer, which shares the scratch
        _merge_chunks(
            Partial_Out,
            Partial_Lse,
            out_ptrs,
            first_rows,
            offs_d,
            num_splits,
            mask_h,
            mask_hd,
            HEAD_DIM,
        )


@triton.jit
def _merge_chunks(
    Partial_Out, Partial_Lse, out_ptrs, first_rows, offs_d, num_splits, mask_h, mask_hd, HEAD_DIM
):
    """Combine a request's chunk outputs by their log-sum-exp, one row per q head. The loads
    bypass L1, which may hold lines of these rows from an earlier layer or step."""
    m = tl.full(first_rows.shape, float("-inf"), tl.float32)
    total = tl.zeros(first_rows.shape, tl.float32)
    acc = tl.zeros(out_ptrs.shape, tl.float32)
    for split in range(num_splits):
        lse = tl.load(
            Partial_Lse + first_rows + split, mask=mask_h, other=0.0, cache_modifier=".cg"
        )
        part = tl.load(
            Partial_Out + (first_rows + split)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_hd,
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, lse)
        rescale = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)
        acc = acc * rescale[:, None] + weight[:, None] * part
        total = total * rescale + weight
        m = m_new
    tl.store(out_ptrs, (acc / total[:, None]).to(out_ptrs.dtype.element_ty), mask=mask_hd)


@triton.jit
def _extend_kernel(
    Q,
    Out,
    K_Buffer,
    V_Buffer,
    Req_To_Token,
    Req_Pool_Indices,
    Prefix_Lens,
    Extend_Lens,
    Extend_Starts,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_req,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0)
    head = tl.program_id(1)
    # Later query blocks see more keys: start them first so the short ones fill the tail.
    block_m = tl.num_programs(2) - 1 - tl.program_id(2)

    extend_len = tl.load(Extend_Lens + batch)
    if block_m * BLOCK_M >= extend_len:
        return
    prefix_len = tl.load(Prefix_Lens + batch)
    first_token = tl.load(Extend_Starts + batch)
    kv_head = head // GROUP

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < extend_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    tokens = first_token + offs_m
    q = tl.load(
        Q + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix_len + offs_m
    token_row = Req_To_Token + tl.load(Req_Pool_Indices + batch) * stride_req
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # Keys before the block's first query are visible to all its rows; the block's own new
    # tokens need the causal mask. Position 0 is visible to every row, so the running max
    # is finite after the first key block of either loop.
    diagonal_start = prefix_len + block_m * BLOCK_M
    diagonal_end = prefix_len + tl.minimum((block_m + 1) * BLOCK_M, extend_len)
    acc, l_i, m_i = _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        token_row,
        K_Buffer,
        V_Buffer,
        kv_head,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        sm_scale_log2,
        0,
        diagonal_start,
        CAUSAL=False,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=DOT_PRECISION,
    )
    acc, l_i, m_i = _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        token_row,
        K_Buffer,
        V_Buffer,
        kv_head,
        stride_ks,
        stride_kh,
        stride_vs,
        stride_vh,
        sm_scale_log2,
        diagonal_start,
        diagonal_end,
        CAUSAL=True,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=DOT_PRECISION,
    )

    tl.store(
        Out + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


class DecodeConfig(NamedTuple):
    block_n: int  # keys per loop iteration
    min_split: int  # fewest keys in one flash-decoding chunk
    num_warps: int
    num_stages: int


def default_decode_config(head_dim: int) -> DecodeConfig:
    # Best of a sweep on H100 (bf16, 28/4 heads, head_dim 128, batches of 1-192 with mixed
    # context lengths): 128-key blocks with three stages in flight keep more gathered K/V
    # loads outstanding; 8% faster than 64-key blocks with two stages at batch 136.
    if _block_d(head_dim) <= 128:
        return DecodeConfig(block_n=128, min_split=MIN_TOKENS_PER_SPLIT, num_warps=4, num_stages=3)
    return DecodeConfig(block_n=32, min_split=MIN_TOKENS_PER_SPLIT, num_warps=4, num_stages=2)


class DecodeScratch(NamedTuple):
    """Flash-decoding buffers of one forward, shared by its layers."""

    partial_out: torch.Tensor  # [batch, num_heads, max_kv_splits, head_dim] fp32
    partial_lse: torch.Tensor  # [batch, num_heads, max_kv_splits] fp32
    arrivals: torch.Tensor  # [batch, num_kv_heads] int32, zero between kernels

    @classmethod
    def allocate(
        cls,
        batch: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_kv_splits: int,
        device: torch.device,
    ) -> DecodeScratch:
        shape = (batch, num_heads, max_kv_splits)
        return cls(
            torch.empty((*shape, head_dim), dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
            torch.zeros((batch, num_kv_heads), dtype=torch.int32, device=device),
        )


def decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    out: torch.Tensor,  # [batch, num_heads, head_dim]
    k_buffer: torch.Tensor,  # [num_slots + 1, num_kv_heads, head_dim]
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,  # [rows, max_context_len]
    req_pool_indices: torch.Tensor,  # [batch]
    seq_lens: torch.Tensor,  # [batch], KV length including the token being decoded
    scratch: DecodeScratch,
    sm_scale: float,
    config: DecodeConfig | None = None,  # None: default_decode_config
) -> None:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    max_kv_splits = scratch.partial_lse.shape[-1]
    group = num_heads // num_kv_heads
    config = config or default_decode_config(head_dim)
    _decode_kernel[(batch, num_kv_heads, max_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        out,
        *scratch,
        sm_scale * LOG2_E,
        num_heads,
        num_kv_heads,
        max_kv_splits,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=_block_d(head_dim),
        BLOCK_N=config.block_n,
        MIN_SPLIT=config.min_split,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        PDL=supports_pdl(q),
    )


class ExtendConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_extend_config(head_dim: int) -> ExtendConfig:
    # Best of a sweep on H100 (bf16, 28/4 heads, head_dim 128): 2.5x faster than 8 warps and
    # 2 stages for a 4k prefill; deeper pipelining hides the latency of the gathered K/V loads.
    if _block_d(head_dim) <= 128:
        return ExtendConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


def extend_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], requests' new tokens back to back
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_buffer: torch.Tensor,  # [num_slots + 1, num_kv_heads, head_dim], new K/V already written
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,  # [batch]
    prefix_lens: torch.Tensor,  # [batch] cached tokens before the new ones
    extend_lens: torch.Tensor,  # [batch] new tokens
    extend_starts: torch.Tensor,  # [batch] index of each request's first new token in q
    max_extend_len: int,
    sm_scale: float,
    config: ExtendConfig | None = None,  # block sizes; None: default_extend_config
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = req_pool_indices.shape[0]
    config = config or default_extend_config(head_dim)
    grid = (batch, num_heads, triton.cdiv(max_extend_len, config.block_m))
    _extend_kernel[grid](
        q,
        out,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        extend_lens,
        extend_starts,
        sm_scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        GROUP=num_heads // k_buffer.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
