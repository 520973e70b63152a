"""The video bench: its test videos, its baseline embeddings, and a CI smoke run (CPU, tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cubeserve.bench import video
from cubeserve.multimodal.processors.quicksviewer import IMAGE_PLACEHOLDER_ID
from cubeserve.multimodal.video import probe_video, read_video


def test_looped_video_files_decode_like_recordings(tmp_path: Path) -> None:
    spec = video.VideoSpec(width=64, height=48, fps=10, gop=5)
    stretch = video.LoopedVideo(spec, num_gops=3, seed=0)
    first = stretch.write(tmp_path / "a.mp4", seconds=4.0)
    rotated = stretch.write(tmp_path / "b.mp4", seconds=4.0, first_gop=1)
    probe = probe_video(first)
    assert (probe.frame_count, probe.fps, probe.width, probe.height) == (40, 10.0, 64, 48)
    frames = read_video(first, fps=10).frames
    sequential = read_video(first, fps=10, decode_mode="sequential").frames
    assert frames.shape == (40, 48, 64, 3) and np.array_equal(frames, sequential)
    # GOP g of the stretch repeats every 3 GOPs; the rotated file starts one GOP later.
    assert np.array_equal(frames[15:20], frames[0:5])
    assert np.array_equal(read_video(rotated, fps=10).frames[0:5], frames[5:10])
    with av.open(str(first)) as container:
        keyframes = [p.pts for p in container.demux(video=0) if p.size and p.is_keyframe]
    assert len(keyframes) == 8


def test_baseline_embeddings_put_each_block_at_its_placeholder() -> None:
    embed = torch.nn.Embedding(10, 4)
    blocks = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    with torch.no_grad():
        out = video.assemble_embeddings(
            embed, [1, IMAGE_PLACEHOLDER_ID, IMAGE_PLACEHOLDER_ID, 2], blocks
        )
        assert torch.equal(out, torch.cat([embed.weight[1:2], *blocks, embed.weight[2:3]]))


def test_smoke_run_writes_one_complete_record(tmp_path: Path, capsys) -> None:
    video.main(
        [
            "--model-shape", "tiny", "--device", "cpu", "--max-total-tokens", "8192",
            "--video-seconds", "6", "--width", "64", "--height", "48",
            "--concurrency", "2", "--concurrent-seconds", "3", "--output-len", "2",
            "--baseline-decode-seconds", "2",
            "--save", "--results-dir", str(tmp_path), "--run-name", "smoke",
        ]
    )  # fmt: skip
    (record,) = [json.loads(line) for line in (tmp_path / "video.jsonl").read_text().splitlines()]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in printed] == [record]

    assert (record["bench"], record["run_name"], record["model_shape"]) == (
        "video",
        "smoke",
        "tiny",
    )
    assert record["video"] | {"codec": None} == {
        "seconds": 6.0,
        "width": 64,
        "height": 48,
        "fps": 30.0,
        "gop": 30,
        "codec": None,
        "sample_fps": 1.0,
        "sampled_frames": 6,
    }
    ours, baseline = record["cubeserve"], record["baseline"]
    assert ours["ttft_s"] > 0 and baseline["ttft_s"] > 0
    assert set(ours["breakdown_s"]) == {
        "decode",
        "frontend_decode_resize_hash",
        "vision",
        "prefill",
    }
    assert set(baseline["breakdown_s"]) == {"decode", "preprocess", "vision", "prefill"}
    assert all(seconds > 0 for seconds in [*ours["breakdown_s"].values()])
    assert baseline["ttft_s"] == pytest.approx(sum(baseline["breakdown_s"].values()), abs=1e-3)
    assert baseline["decode_timed_frames"] == 60  # 2 s at 30 fps

    second = ours["second_turn"]
    assert second["ttft_s"] > 0 and second["encoder_cache_hits"] == 1
    assert second["cached_tokens"] >= record["prompt_tokens"]
    streams = ours["streams_while_video_arrives"]
    assert streams["streams"] == 2 and streams["video_ttft_s"] > 0
    # Both streams decoded before the video came and kept decoding until its first token.
    assert streams["itl_before_ms"]["count"] >= 2 and streams["itl_during_ms"]["count"] >= 2
    assert 0 < streams["itl_during_ms"]["p50"] <= streams["itl_during_ms"]["max"]
    assert streams["itl_during_ms"]["max"] <= 1000 * streams["video_ttft_s"]
    concurrent, one_at_a_time = ours["concurrent"], baseline["concurrent_one_at_a_time"]
    assert (concurrent["videos"], concurrent["output_len"]) == (2, 2)
    for serving in (concurrent, one_at_a_time):
        assert 0 < serving["ttft_p50_s"] <= serving["ttft_p90_s"] <= serving["wall_s"]
        assert serving["videos_per_min"] == pytest.approx(120 / serving["wall_s"], rel=0.05)
    assert set(record["speedup_vs_baseline"]) == {"ttft", "videos_per_min"}
    assert record["env"]["cpus"] >= 1 and record["env"]["device"]


def test_vision_bench_times_every_stage_against_hf_siglip(tmp_path: Path, capsys) -> None:
    from cubeserve.bench import vision

    vision.main(
        [
            "--model-shape", "tiny-384", "--device", "cpu", "--frames", "6", "--repeats", "1",
            "--save", "--results-dir", str(tmp_path),
        ]
    )  # fmt: skip
    (record,) = [json.loads(line) for line in (tmp_path / "vision.jsonl").read_text().splitlines()]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in printed] == [record]
    assert (record["bench"], record["frames"], record["dtype"]) == ("vision", 6, "float32")
    stages = record["cubeserve_ms"]
    expected = {"upload_normalize", "tower", "cubing", "resampler", "thumbnail", "encode_video"}
    assert set(stages) == expected
    assert all(ms > 0 for ms in stages.values())
    assert record["hf_ms"]["tower"] > 0 and record["speedup_vs_hf"]["tower"] > 0
    # Same weights, same frames, fp32: the tower (27x27 grid resized to 24x24) is HF's.
    assert record["tower_max_abs_diff_vs_hf"] < 1e-4
    assert record["num_cubes"] >= 1 and record["tower_tflop_per_s"] > 0
