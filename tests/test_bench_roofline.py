"""``cubeserve.bench.roofline``: per-token costs from a config, the per-forward bound, and the
replay of the scheduler's plan (CPU, demo model)."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import Qwen2Config

from cubeserve.bench import roofline, throughput
from cubeserve.bench.roofline import ForwardShape, ModelCost, Peaks, bound_seconds, plan_forwards
from cubeserve.server_args import ServerArgs

QWEN25_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
)


def test_model_cost_of_qwen25_7b_matches_its_published_sizes() -> None:
    cost = ModelCost.from_config(QWEN25_7B)
    # Qwen's model card: 7.61B parameters, 6.53B of them non-embedding (untied LM head).
    assert round(cost.linear_params / 1e9, 2) == 6.53
    assert round((cost.linear_params + 2 * cost.lm_head_params) / 1e9, 2) == 7.62
    # 28 layers x (K, V) x 4 kv heads x 128 dims x 2 bytes.
    assert cost.kv_bytes_per_key == 57344
    assert cost.attention_flops_per_pair == 28 * 28 * 128 * 4


def test_each_forward_is_bound_by_its_slower_resource() -> None:
    cost = ModelCost(
        linear_params=100,
        lm_head_params=10,
        attention_flops_per_pair=4,
        kv_bytes_per_key=8,
        bytes_per_param=2,
    )
    decode = ForwardShape("decode", new_tokens=2, sampled_rows=2, attention_pairs=30, keys_read=30)
    prefill = ForwardShape(
        "prefill", new_tokens=50, sampled_rows=1, attention_pairs=1275, keys_read=50
    )
    peaks = Peaks(flops=100.0, bandwidth=10.0)
    # decode: FLOPs 400 + 40 + 120 = 560 -> 5.6 s; bytes 220 + 240 = 460 -> 46 s (memory-bound)
    assert cost.flops(decode) == 560 and cost.bytes_read(decode) == 460
    # prefill: FLOPs 10000 + 20 + 5100 = 15120 -> 151.2 s; bytes 220 + 400 -> 62 s
    assert cost.flops(prefill) == 15120 and cost.bytes_read(prefill) == 620
    assert bound_seconds([decode, prefill], cost, peaks) == pytest.approx(46.0 + 151.2)


def test_plan_of_short_requests_is_one_prefill_then_decodes() -> None:
    forwards = plan_forwards(ServerArgs(), input_lens=[5, 7, 3], output_lens=[2, 4, 1])
    assert forwards == [
        # all three prompts at once: 15 tokens, causal pairs 15 + 28 + 6, one row each sampled
        ForwardShape("prefill", 15, 3, 49, 15),
        # the 1-token request is done; the others decode on contexts of 6 and 8
        ForwardShape("decode", 2, 2, 6 + 8, 6 + 8),
        ForwardShape("decode", 1, 1, 9, 9),
        ForwardShape("decode", 1, 1, 10, 10),
    ]


def test_plan_respects_the_chunk_budget_and_mixes_decodes_in() -> None:
    input_lens, output_lens = [10, 10, 9], [3, 5, 2]
    forwards = plan_forwards(ServerArgs(chunked_prefill_size=8), input_lens, output_lens)
    assert max(f.new_tokens for f in forwards) <= 8
    assert {f.kind for f in forwards} == {"prefill", "mixed", "decode"}
    # Every prompt token and every output but the last goes through the model once.
    assert sum(f.new_tokens for f in forwards) == sum(input_lens) + sum(output_lens) - 3
    assert sum(f.sampled_rows for f in forwards) == sum(output_lens)


def test_cli_reports_the_bound_for_given_peaks(tmp_path, capsys) -> None:
    roofline.main(
        [
            "--num-prompts", "4",
            "--input-len-range", "8", "16",
            "--output-len-range", "2", "6",
            "--peak-tflops", "100",
            "--peak-tbps", "2",
            "--save",
            "--results-dir", str(tmp_path),
        ]
    )  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "roofline.jsonl").read_text())
    assert printed == saved
    bound = saved["bounds"]["given"]
    assert (bound["peak_tflops"], bound["peak_tbps"]) == (100.0, 2.0)
    assert bound["max_output_tok_s"] == pytest.approx(
        saved["output_tokens"] / bound["min_duration_s"], rel=1e-3
    )
    # The four prompts fit one prefill; then one decode per further token of the longest.
    lengths = argparse.Namespace(
        seed=1, num_prompts=4, input_len_range=[8, 16], output_len_range=[2, 6]
    )
    _, output_lens = throughput.sample_lengths(lengths)
    assert saved["output_tokens"] == sum(output_lens)
    assert saved["forwards"] == {"prefill": 1, "decode": max(output_lens) - 1}


def test_cli_needs_peaks() -> None:
    with pytest.raises(SystemExit):
        roofline.main(["--num-prompts", "2"])
