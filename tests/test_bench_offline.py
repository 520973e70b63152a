"""``python -m cubeserve.bench.offline`` end to end on the demo model (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "bench", "run_name", "model", "device", "dtype", "num_prompts", "input_len", "output_len",
    "cubeserve_output_tok_s", "hf_output_tok_s", "speedup", "greedy_outputs_match", "env",
}  # fmt: skip


def test_prints_one_json_line_and_matches_hf_greedy(demo_cache_dir: Path) -> None:
    command = [sys.executable, "-m", "cubeserve.bench.offline", "--device", "cpu"]
    command += ["--num-prompts", "3", "--input-len", "8", "--output-len", "6"]
    env = {**os.environ, "CUBESERVE_CACHE": str(demo_cache_dir)}
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert set(report) == KEYS
    assert report["bench"] == "offline"
    assert (report["device"], report["dtype"]) == ("cpu", "float32")
    assert (report["num_prompts"], report["input_len"], report["output_len"]) == (3, 8, 6)
    assert report["cubeserve_output_tok_s"] > 0 and report["hf_output_tok_s"] > 0
    assert report["greedy_outputs_match"] == 1.0  # same weights, float32, greedy: same tokens
