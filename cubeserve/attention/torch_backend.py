"""Reference paged attention in plain PyTorch (any device, any dtype).

Per forward, the requests are laid out as a padded batch: queries ``[batch, max_new, ...]``
and the KV slots of each request's whole sequence ``[batch, max_kv]``, with a causal mask
that also hides padding. Every layer then runs one batched SDPA call over K/V gathered from
the paged cache; no Python loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cubeserve.attention.base import AttentionBackend, register_attention_backend
from cubeserve.engine.forward_batch import ForwardBatch
from cubeserve.layers.attention import PagedAttention


@dataclass
class TorchAttentionMetadata:
    query_index: torch.Tensor  # [batch, max_new] flat token index of each padded query
    kv_slots: torch.Tensor  # [batch, max_kv] KV slot of each position of each request
    mask: torch.Tensor  # [batch, 1, max_new, max_kv] True where the query may attend
    token_to_padded: torch.Tensor  # [num_tokens] row of each flat token in [batch * max_new]


@register_attention_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        new_lens_cpu = [1] * batch.batch_size if batch.mode.is_decode else batch.extend_seq_lens_cpu
        max_new, max_kv = max(new_lens_cpu), max(batch.seq_lens_cpu)
        new_lens = torch.tensor(new_lens_cpu, dtype=torch.int64, device=device)
        seq_lens = torch.tensor(batch.seq_lens_cpu, dtype=torch.int64, device=device)
        starts = torch.cumsum(new_lens, dim=0) - new_lens
        new_pos = torch.arange(max_new, device=device)
        kv_pos = torch.arange(max_kv, device=device)

        # Query j of request b sits at position prefix_b + j; padded queries (j >= new_b) are
        # clamped to the last real one so that no mask row is empty (SDPA would return NaN).
        query_pos = (seq_lens - new_lens).unsqueeze(1) + new_pos
        last_visible = torch.minimum(query_pos, (seq_lens - 1).unsqueeze(1))
        mask = kv_pos.view(1, 1, max_kv) <= last_visible.unsqueeze(2)

        query_index = (starts.unsqueeze(1) + new_pos).clamp(max=batch.num_tokens - 1)
        request_of_token = torch.repeat_interleave(
            torch.arange(batch.batch_size, device=device), new_lens, output_size=batch.num_tokens
        )
        token_to_padded = (
            request_of_token * max_new
            + torch.arange(batch.num_tokens, device=device)
            - starts[request_of_token]
        )
        kv_slots = batch.req_to_token_pool.req_to_token[batch.req_pool_indices, :max_kv]
        batch.attn_metadata = TorchAttentionMetadata(
            query_index, kv_slots, mask.unsqueeze(1), token_to_padded
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
        batch.kv_cache.set_kv(
            layer.layer_id,
            batch.out_cache_loc,
            k.view(num_tokens, layer.num_kv_heads, head_dim),
            v.view(num_tokens, layer.num_kv_heads, head_dim),
        )
        # [batch, heads, len, head_dim] views for SDPA.
        queries = q.view(num_tokens, layer.num_heads, head_dim)[meta.query_index].transpose(1, 2)
        keys = batch.kv_cache.k_buffers[layer.layer_id][meta.kv_slots].to(q.dtype).transpose(1, 2)
        values = batch.kv_cache.v_buffers[layer.layer_id][meta.kv_slots].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=meta.mask,
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        padded = out.transpose(1, 2).reshape(-1, layer.num_heads * head_dim)
        return padded[meta.token_to_padded]
