"""CI smoke run of ``cubeserve.bench.itl`` on the demo model (CPU, tiny workload), and the ITL
window split it shares with ``cubeserve.bench.serving``."""

from __future__ import annotations

import json

from cubeserve.bench import itl
from cubeserve.bench.common import ratio
from cubeserve.bench.serving import split_itls

SUMMARY_KEYS = {"mean", "p50", "p90", "p99", "max", "count"}


def test_split_itls_counts_the_gap_spanning_the_window_start_as_inside() -> None:
    times = [0.0, 1.0, 2.0, 5.0, 6.0, 9.0, 12.0]
    before, inside = split_itls(times, window_start=3.0, window_end=9.0)
    assert before == [1.0, 1.0]
    assert inside == [3.0, 1.0, 3.0]  # 2 -> 5 spans the start; 9 -> 12 ends after the window


def test_itl_bench_compares_prefill_only_and_mixed_runs(tmp_path, capsys) -> None:
    itl.main(
        [
            "--device", "cpu",
            "--streams", "2",
            "--stream-input-len", "8",
            "--stream-output-len", "2000",
            "--inject-requests", "2",
            "--inject-input-len", "96",
            "--inject-interval-s", "0.05",
            "--chunked-prefill-size", "32",
            "--baseline-s", "0.5",
            "--save",
            "--results-dir", str(tmp_path),
            "--run-name", "smoke",
        ]
    )  # fmt: skip
    (saved,) = [json.loads(line) for line in (tmp_path / "itl.jsonl").read_text().splitlines()]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in printed] == [saved]

    assert saved["bench"] == "itl" and saved["run_name"] == "smoke" and saved["env"]["device"]
    assert saved["chunked_prefill_size"] == 32 and saved["workload"]["inject_input_len"] == 96
    for mode in ("prefill_only", "mixed"):
        report = saved[mode]
        baseline, injection = report["baseline_itl_ms"], report["injection_itl_ms"]
        assert set(baseline) == set(injection) == SUMMARY_KEYS
        assert baseline["count"] > 0 and injection["count"] > 0
        assert report["injected_ttft_ms"]["count"] == 2
        assert report["streams_outlived_injection"] == 2
        assert report["injection_over_baseline"] == {
            key: ratio(injection[key], baseline[key]) for key in ("p50", "p99", "max")
        }
    on, off = (saved[mode]["injection_itl_ms"] for mode in ("mixed", "prefill_only"))
    assert saved["mixed_over_prefill_only"] == {
        key: ratio(on[key], off[key]) for key in ("p50", "p99", "max")
    }
