"""cubeserve Qwen2 / Llama (llama3 rope) / Qwen3 vs. transformers on the same tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from model_factory import (
    FAMILIES,
    PagedHarness,
    load_cubeserve_model,
    load_hf_model,
    make_tiny_checkpoint,
    tiny_config,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cubeserve.layers.rotary import RotaryEmbedding

PROMPT_LENS = [1, 3, 5, 8, 13, 17, 24, 31]
NEW_TOKENS = 32
CASES = [(family, tied) for family in FAMILIES for tied in (False, True)]


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.fixture(
    scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]
)
def checkpoint(request, tmp_path_factory):
    family, tied = request.param
    return make_tiny_checkpoint(tmp_path_factory.mktemp(family), family, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return load_hf_model(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_cubeserve_model(checkpoint)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=generator).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_last_logits(hf_model, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([hf_model(torch.tensor([p])).logits[0, -1] for p in prompts])


def test_flat_prefill_matches_transformers(model, prompts, hf_last_logits):
    harness = PagedHarness(model)
    rows = [harness.add_request() for _ in prompts]

    logits = harness.extend(rows, prompts)

    assert logits.dtype == torch.float32
    assert logits.shape == hf_last_logits.shape
    _assert_logits_close(logits, hf_last_logits)


def test_chunked_prefill_over_cached_prefix_matches_transformers(model, prompts, hf_last_logits):
    harness = PagedHarness(model)
    rows = [harness.add_request() for _ in prompts]
    chunk_sizes = [1 + i % 4 for i in range(len(prompts))]  # mixed prefix lengths in each batch
    done = [0] * len(prompts)
    last_logits: dict[int, torch.Tensor] = {}
    while any(d < len(p) for d, p in zip(done, prompts)):
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        chunks = [prompts[i][done[i] : done[i] + chunk_sizes[i]] for i in active]
        logits = harness.extend([rows[i] for i in active], chunks)
        for i, chunk, row_logits in zip(active, chunks, logits):
            done[i] += len(chunk)
            last_logits[i] = row_logits

    _assert_logits_close(torch.stack([last_logits[i] for i in range(len(prompts))]), hf_last_logits)


def test_greedy_decode_matches_transformers_generate(model, hf_model, prompts):
    outputs = PagedHarness(model).greedy_generate(prompts, NEW_TOKENS)

    for prompt, output in zip(prompts, outputs):
        input_ids = torch.tensor([prompt])
        expected = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )[0, len(prompt) :]
        assert output == expected.tolist()


def test_multimodal_embeddings_replace_placeholder_tokens(model, prompts, hf_last_logits):
    """Placeholder ids (>= vocab) plus the real tokens' embeddings as mm_embeds: same logits."""
    flat_ids = torch.tensor([t for p in prompts for t in p])
    mm_mask = torch.arange(len(flat_ids)) % 3 == 0
    mm_embeds = model.get_input_embeddings()(flat_ids[mm_mask]).detach()
    with_placeholders = [
        [10_000 if m else t for t, m in zip(p, mask)]
        for p, mask in zip(prompts, mm_mask.split(PROMPT_LENS))
    ]
    harness = PagedHarness(model)
    rows = [harness.add_request() for _ in prompts]

    logits = harness.extend(rows, with_placeholders, mm_embeds=mm_embeds, mm_mask=mm_mask)

    _assert_logits_close(logits, hf_last_logits)


def test_input_embeds_are_used_instead_of_input_ids(model, prompts, hf_last_logits):
    embeds = model.get_input_embeddings()(torch.tensor([t for p in prompts for t in p])).detach()
    harness = PagedHarness(model)
    rows = [harness.add_request() for _ in prompts]

    logits = harness.extend(rows, [[0] * len(p) for p in prompts], input_embeds=embeds)

    _assert_logits_close(logits, hf_last_logits)


def test_bfloat16_model_runs_close_to_float32(checkpoint, prompts, hf_last_logits):
    harness = PagedHarness(load_cubeserve_model(checkpoint, dtype=torch.bfloat16))
    rows = [harness.add_request() for _ in prompts]

    logits = harness.extend(rows, prompts)
    logits = torch.cat([logits, harness.decode(rows, logits.argmax(-1).tolist())])

    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[: len(prompts)], hf_last_logits, atol=0.15, rtol=0)


def test_llama3_rope_scaling_matches_transformers_at_long_positions():
    config = tiny_config("llama")
    head_dim = config.hidden_size // config.num_attention_heads
    positions = torch.arange(0, config.max_position_embeddings, 97)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(
        torch.zeros(1, dtype=torch.float32), positions[None]
    )

    cos, sin = RotaryEmbedding.from_config(config, head_dim)(positions, torch.float32)

    torch.testing.assert_close(torch.cat([cos, cos], -1).squeeze(1), hf_cos[0])
    torch.testing.assert_close(torch.cat([sin, sin], -1).squeeze(1), hf_sin[0])
    unscaled = tiny_config("qwen2", rope_theta=500000.0, max_position_embeddings=16384)
    unscaled_cos, _ = RotaryEmbedding.from_config(unscaled, head_dim)(positions, torch.float32)
    assert not torch.allclose(cos, unscaled_cos, atol=1e-3), "llama3 scaling had no effect"


def test_unsupported_rope_type_is_rejected():
    config = tiny_config("qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match="yarn"):
        RotaryEmbedding.from_config(config, 16)
