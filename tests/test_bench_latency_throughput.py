"""CI smoke runs of ``cubeserve.bench.latency`` / ``throughput`` on the demo model (CPU, tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cubeserve.bench import latency, throughput

ENGINE_FLAGS = ["--device", "cpu", "--max-total-tokens", "2048", "--disable-radix-cache"]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_latency_reports_both_engines_and_their_ratio(tmp_path, capsys) -> None:
    latency.main(
        [
            *ENGINE_FLAGS,
            "--batch-size",
            "1",
            "2",
            "--input-len",
            "12",
            "--output-len",
            "8",
            "--save",
            "--results-dir",
            str(tmp_path),
            "--run-name",
            "smoke",
        ]
    )
    records = read_lines(tmp_path / "latency.jsonl")
    printed = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert printed == records
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in records] == [
        (1, 12, 8),
        (2, 12, 8),
    ]
    for record in records:
        assert record["run_name"] == "smoke" and record["env"]["device"]
        for engine in ("cubeserve", "hf"):
            result = record[engine]
            # Decode time is a difference of two timings: on a tiny model it may be ~0 either way.
            assert result["ttft_s"] > 0 and isinstance(result["decode_ms_per_token"], float)
            prefill_tokens = record["batch_size"] * record["input_len"]
            assert result["prefill_tok_s"] == pytest.approx(
                prefill_tokens / result["ttft_s"], rel=0.02
            )
        speedup = record["speedup_vs_hf"]
        assert speedup["prefill"] == round(
            record["cubeserve"]["prefill_tok_s"] / record["hf"]["prefill_tok_s"], 3
        )


def test_throughput_skip_hf_appends_results(tmp_path) -> None:
    args = [
        *ENGINE_FLAGS,
        "--num-prompts",
        "5",
        "--input-len-range",
        "4",
        "20",
        "--output-len-range",
        "1",
        "6",
        "--skip-hf",
        "--save",
        "--results-dir",
        str(tmp_path),
    ]
    throughput.main(args)
    throughput.main(args)
    first, second = read_lines(tmp_path / "throughput.jsonl")  # appended, not overwritten
    assert first["hf"] is None and first["speedup_vs_hf"] is None
    result = first["cubeserve"]
    assert result["output_tok_s"] > 0
    assert result["request_s"] == pytest.approx(5 / result["duration_s"], rel=0.01)
    assert second["cubeserve"]["output_tok_s"] > 0


def test_latency_shapes_replace_the_product(tmp_path) -> None:
    latency.main(
        [
            *ENGINE_FLAGS,
            "--skip-hf",
            "--shape", "1", "10", "3",
            "--shape", "2", "6", "4",
            "--repeats", "1",
            "--save",
            "--results-dir",
            str(tmp_path),
        ]
    )  # fmt: skip
    records = read_lines(tmp_path / "latency.jsonl")
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in records] == [
        (1, 10, 3),
        (2, 6, 4),
    ]


def test_throughput_runs_hf_on_the_first_requests_only(tmp_path) -> None:
    throughput.main(
        [
            *ENGINE_FLAGS,
            "--num-prompts", "6",
            "--input-len-range", "4", "12",
            "--output-len-range", "2", "5",
            "--hf-num-prompts", "2",
            "--hf-batch-size", "2",
            "--save",
            "--results-dir",
            str(tmp_path),
        ]
    )  # fmt: skip
    (record,) = read_lines(tmp_path / "throughput.jsonl")
    assert record["num_prompts"] == 6 and record["hf_num_prompts"] == 2
    hf, ours = record["hf"], record["cubeserve"]
    assert hf["request_s"] == pytest.approx(2 / hf["duration_s"], rel=0.01)
    assert ours["request_s"] == pytest.approx(6 / ours["duration_s"], rel=0.01)
