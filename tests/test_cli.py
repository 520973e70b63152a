"""The ``cubeserve`` command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from media_factory import encode_scenes

from cubeserve.cli import _sampling_params, build_parser, main
from cubeserve.engine.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_VIDEO_MODEL = REPO_ROOT.parent / "shared" / "golden" / "a_qwen2_video_24f" / "model"


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
    argv = ["generate", "hi", "--temperature", "0", "--top-k", "5", "--stop", "a", "--stop", "bc"]
    args = build_parser().parse_args([*argv, "--ignore-eos", "--max-new-tokens", "7", "--device", "cpu"])
    params = _sampling_params(args)
    assert params == {"temperature": 0.0, "top_k": 5, "max_new_tokens": 7, "stop": ["a", "bc"], "ignore_eos": True}
    SamplingParams.from_dict(params).normalize().verify(vocab_size=10)
    assert _sampling_params(build_parser().parse_args(["generate", "hi"])) == {}
    assert args.device == "cpu"  # server args are accepted too


def test_generate_requires_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate"])
    assert "PROMPT" in capsys.readouterr().err


def test_generate_media_must_be_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--video", str(tmp_path / "missing.mp4"), "what happens?"])
    assert "missing.mp4: no such file" in capsys.readouterr().err


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


def run_cli(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUBESERVE_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "cubeserve.cli", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)


def test_generate_streams_a_chat_reply_from_the_real_engine(demo_cache_dir: Path) -> None:
    result = run_cli("generate", "Hello", "--device", "cpu", "--max-new-tokens", "8", "--temperature", "0",
                     "--ignore-eos", cache_dir=demo_cache_dir)
    assert result.returncode == 0, result.stderr
    assert "Engine ready" in result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()


@pytest.mark.skipif(not GOLDEN_VIDEO_MODEL.is_dir(), reason="shared/golden is not available")
def test_generate_answers_about_a_video_file(tmp_path: Path, demo_cache_dir: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_scenes(num_frames=30, rate=10))
    result = run_cli("generate", "--video", str(clip), "What happens?", "--model-path", str(GOLDEN_VIDEO_MODEL),
                     "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4", "--temperature", "0",
                     "--ignore-eos", cache_dir=demo_cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # The video reached the model: the engine reports how it cut the 3 s clip into cubes.
    assert re.search(r"video 1: [1-9]\d* cubes at \d\.\d-\d\.\ds", result.stderr), result.stderr
