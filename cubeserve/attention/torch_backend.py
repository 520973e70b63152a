"""Reference paged attention in plain PyTorch (any device, any dtype).

Per forward, the requests are laid out as padded batches: queries ``[n, max_new, ...]`` and
the KV slots of each request's whole sequence ``[n, max_kv]``, with a causal mask that also
hides padding. Requests with one new token (decodes, also inside mixed prefill batches) and
requests with several form separate groups: padding a decode to a prompt chunk's length would
multiply the chunk's attention cost by the number of decodes. Every layer then runs one
batched SDPA call per group (at most two) over K/V gathered from the paged cache; no Python
loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cubeserve.attention.base import AttentionBackend, register_attention_backend
from cubeserve.engine.forward_batch import ForwardBatch
from cubeserve.layers.attention import PagedAttention


@dataclass
class QueryGroup:
    """Requests attended by one SDPA call, padded to the group's longest query and KV."""

    tokens: torch.Tensor  # [group_tokens] flat index of each of the group's tokens
    query_index: torch.Tensor  # [n, max_new] flat token index of each padded query
    kv_slots: torch.Tensor  # [n, max_kv] KV slot of each position of each request
    mask: torch.Tensor  # [n, 1, max_new, max_kv] True where the query may attend
    token_to_padded: torch.Tensor  # [group_tokens] row of each group token in [n * max_new]


@dataclass
class TorchAttentionMetadata:
    groups: list[QueryGroup]


@register_attention_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        new_lens = [1] * batch.batch_size if batch.mode.is_decode else batch.extend_seq_lens_cpu
        starts = [0] * batch.batch_size
        for i in range(1, batch.batch_size):
            starts[i] = starts[i - 1] + new_lens[i - 1]
        single = [i for i, n in enumerate(new_lens) if n == 1]
        multi = [i for i, n in enumerate(new_lens) if n > 1]
        batch.attn_metadata = TorchAttentionMetadata(
            [_query_group(batch, reqs, new_lens, starts) for reqs in (single, multi) if reqs]
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: PagedAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        meta: TorchAttentionMetadata = batch.attn_metadata
        num_tokens, head_dim = q.shape[0], layer.head_dim
        self.store_kv(k, v, layer, batch)
        q = q.view(num_tokens, layer.num_heads, head_dim)
        if len(meta.groups) == 1:  # every token is in the group, in order
            return _attend(q, layer, batch, meta.groups[0])
        out = q.new_empty(num_tokens, layer.num_heads * head_dim)
        for group in meta.groups:
            out[group.tokens] = _attend(q, layer, batch, group)
        return out


def _query_group(
    batch: ForwardBatch, reqs: list[int], new_lens_cpu: list[int], starts_cpu: list[int]
) -> QueryGroup:
    device = batch.input_ids.device
    group_new_lens = [new_lens_cpu[i] for i in reqs]
    group_seq_lens = [batch.seq_lens_cpu[i] for i in reqs]
    max_new, max_kv, num_tokens = max(group_new_lens), max(group_seq_lens), sum(group_new_lens)
    new_lens = torch.tensor(group_new_lens, dtype=torch.int64, device=device)
    seq_lens = torch.tensor(group_seq_lens, dtype=torch.int64, device=device)
    starts = torch.tensor([starts_cpu[i] for i in reqs], dtype=torch.int64, device=device)
    new_pos = torch.arange(max_new, device=device)
    kv_pos = torch.arange(max_kv, device=device)

    # Query j of request b sits at position prefix_b + j; padded queries (j >= new_b) repeat
    # the last real one so that no mask row is empty (SDPA would return NaN).
    query_pos = (seq_lens - new_lens).unsqueeze(1) + new_pos
    last_visible = torch.minimum(query_pos, (seq_lens - 1).unsqueeze(1))
    mask = kv_pos.view(1, 1, max_kv) <= last_visible.unsqueeze(2)
    query_index = starts.unsqueeze(1) + torch.minimum(new_pos, (new_lens - 1).unsqueeze(1))

    request_of_token = torch.repeat_interleave(
        torch.arange(len(reqs), device=device), new_lens, output_size=num_tokens
    )
    offset_in_request = (
        torch.arange(num_tokens, device=device)
        - (torch.cumsum(new_lens, dim=0) - new_lens)[request_of_token]
    )
    rows = batch.req_pool_indices[torch.tensor(reqs, device=device)]
    return QueryGroup(
        tokens=starts[request_of_token] + offset_in_request,
        query_index=query_index,
        kv_slots=batch.req_to_token_pool.req_to_token[rows, :max_kv],
        mask=mask.unsqueeze(1),
        token_to_padded=request_of_token * max_new + offset_in_request,
    )


def _attend(
    q: torch.Tensor, layer: PagedAttention, batch: ForwardBatch, group: QueryGroup
) -> torch.Tensor:
    """Attention output ``[group_tokens, num_heads * head_dim]`` of the group's tokens."""
    # [n, heads, len, head_dim] views for SDPA.
    queries = q[group.query_index].transpose(1, 2)
    cache = batch.kv_cache
    keys = cache.k_buffers[layer.layer_id][group.kv_slots].to(q.dtype).transpose(1, 2)
    values = cache.v_buffers[layer.layer_id][group.kv_slots].to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries,
        keys,
        values,
        attn_mask=group.mask,
        scale=layer.scaling,
        enable_gqa=layer.num_heads != layer.num_kv_heads,
    )
    padded = out.transpose(1, 2).reshape(-1, layer.num_heads * layer.head_dim)
    return padded[group.token_to_padded]
