"""The ``cubeserve`` command line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cubeserve.cli import _sampling_params, build_parser, main
from cubeserve.engine.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_ENGINE = importlib.util.find_spec("cubeserve.engine.engine") is not None


def test_demo_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "demo"
    assert main(["demo-model", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file()


def test_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "cubeserve.cli", "demo-model", str(target)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "config.json").is_file()


def test_generate_flags_become_sampling_params() -> None:
    argv = ["generate", "--prompt", "hi", "--temperature", "0", "--top-k", "5", "--stop", "a", "--stop", "bc"]
    args = build_parser().parse_args([*argv, "--ignore-eos", "--max-new-tokens", "7", "--device", "cpu"])
    params = _sampling_params(args)
    assert params == {"temperature": 0.0, "top_k": 5, "max_new_tokens": 7, "stop": ["a", "bc"], "ignore_eos": True}
    SamplingParams.from_dict(params).normalize().verify(vocab_size=10)
    assert _sampling_params(build_parser().parse_args(["generate", "--prompt", "hi"])) == {}
    assert args.device == "cpu"  # server args are accepted too


def test_generate_requires_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate"])
    assert "--prompt" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "convert"])
def test_serve_and_convert_are_delegated(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"cubeserve {command}" in capsys.readouterr().out


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "generate", "demo-model", "convert"):
        assert command in out


@pytest.mark.skipif(not HAS_ENGINE, reason="cubeserve/engine/engine.py not written yet")
def test_generate_streams_from_the_real_engine(tmp_path: Path) -> None:
    env = {**os.environ, "CUBESERVE_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "cubeserve.cli", "generate", "--prompt", "Hello", "--chat", "--device", "cpu"]
    command += ["--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Engine ready" in result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
