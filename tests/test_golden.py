"""The golden runner (``cubeserve.tools.golden``) on every golden case, with the original and the
converted checkpoint, and the requests the original Quicksviewer mishandles (README 7.1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cubeserve.multimodal.processors.quicksviewer import IMAGE_PLACEHOLDER_ID
from cubeserve.tools.convert import convert
from cubeserve.tools.golden import (
    TENSOR_ATOL,
    RequestTrace,
    TracingEngine,
    compare,
    expected_dir_of,
    is_sampling_request,
    run_case,
)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
if not GOLDEN.is_dir():
    pytest.skip(f"golden cases not found at {GOLDEN}", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
P = IMAGE_PLACEHOLDER_ID


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def request_of(case: str) -> dict:
    return read_json(GOLDEN / case / "input" / "request.json")


def expected_of(case: str) -> dict:
    return read_json(expected_dir_of(GOLDEN / case) / "expected.json")


CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "input" / "request.json").is_file())
SAMPLING_CASES = [c for c in CASES if is_sampling_request(request_of(c))]
MODEL_CASES = [c for c in CASES if c not in SAMPLING_CASES]
VIDEO_CASES = [c for c in MODEL_CASES if request_of(c)["modality"] == "video"]
LLAMA_CASES = [c for c in MODEL_CASES if request_of(c)["backbone"].startswith("llama")]
RUNS = [(case, fmt) for case in MODEL_CASES for fmt in ("original", "converted")]
RUN_IDS = [f"{case}-{fmt}" for case, fmt in RUNS]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Output folder of a case run on its original or converted checkpoint, computed once."""
    outputs: dict[tuple[str, str], Path] = {}

    def run(case: str, fmt: str) -> Path:
        if (case, fmt) not in outputs:
            root = tmp_path_factory.mktemp(f"{case}-{fmt}")
            model_dir = GOLDEN / case / "model"
            if fmt == "converted":
                model_dir = convert(model_dir, root / "model")
            outputs[case, fmt] = run_case(GOLDEN / case, root / "out", model_dir=model_dir)
        return outputs[case, fmt]

    return run


def produced_of(out_dir: Path) -> dict:
    return read_json(out_dir / "expected.json")


# --------------------------------------------------------------------------- model cases


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_prompt_and_token_ids(golden_run, case: str, fmt: str) -> None:
    expected, produced = expected_of(case), produced_of(golden_run(case, fmt))
    assert produced["prompt"] == expected["prompt"]
    assert produced["input_ids"] == expected["input_ids"]


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_cube_bounds(golden_run, case: str, fmt: str) -> None:
    expected, produced = expected_of(case), produced_of(golden_run(case, fmt))
    if "video" not in expected:
        assert "video" not in produced
        return
    for key in ("cube_bound_as_returned", "kept_timestamps", "timestamps"):
        assert produced["video"][key] == expected["video"][key], key
    assert (
        produced["video"]["cubing"]["frame_bounds"] == expected["video"]["cubing"]["frame_bounds"]
    )


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_token_layout_after_cube_merge(golden_run, case: str, fmt: str) -> None:
    expected, produced = expected_of(case), produced_of(golden_run(case, fmt))
    layout = produced["layout_after_cube_merge"]["input_ids"]
    assert layout == expected["layout_after_cube_merge"]["input_ids"]
    assert produced["inputs_embeds"]["shape"] == expected["inputs_embeds"]["shape"]


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_embeddings_and_logits_within_tolerance(golden_run, case: str, fmt: str) -> None:
    out_dir = golden_run(case, fmt)
    with (
        np.load(GOLDEN / case / "expected" / "tensors.npz") as expected,
        np.load(out_dir / "tensors.npz") as produced,
    ):
        assert set(produced.files) == set(expected.files)
        for name in ("inputs_embeds", "last_prompt_logits", "step_logits"):
            np.testing.assert_allclose(
                produced[name], expected[name], rtol=0, atol=TENSOR_ATOL[name], err_msg=name
            )


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_greedy_tokens_and_text(golden_run, case: str, fmt: str) -> None:
    expected, produced = (
        expected_of(case)["generated"],
        produced_of(golden_run(case, fmt))["generated"],
    )
    assert produced["raw_output_ids"] == expected["raw_output_ids"]
    assert produced["stopped_on_eos"] == expected["stopped_on_eos"]
    assert produced["text"] == expected["text"]


@pytest.mark.parametrize(("case", "fmt"), RUNS, ids=RUN_IDS)
def test_compare_finds_no_difference(golden_run, case: str, fmt: str) -> None:
    assert compare(GOLDEN / case / "expected", golden_run(case, fmt)) == []


def test_compare_reports_every_kind_of_difference(golden_run, tmp_path: Path) -> None:
    case = (VIDEO_CASES or MODEL_CASES)[0]
    broken = Path(shutil.copytree(golden_run(case, "original"), tmp_path / "out"))
    produced = produced_of(broken)
    produced["generated"]["raw_output_ids"][0] += 1
    del produced["prompt"]
    (broken / "expected.json").write_text(json.dumps(produced))
    with np.load(broken / "tensors.npz") as tensors:
        arrays = dict(tensors)
    arrays["inputs_embeds"][3, 5] += 10 * TENSOR_ATOL["inputs_embeds"]
    del arrays["last_prompt_logits"]
    np.savez(broken / "tensors.npz", **arrays)

    mismatches = compare(GOLDEN / case / "expected", broken)
    assert len(mismatches) == 4, mismatches
    assert mismatches[0].startswith("prompt: missing")
    assert mismatches[1].startswith("generated.raw_output_ids: first difference at [0]")
    assert any("tensors.npz[inputs_embeds]: max abs difference" in m for m in mismatches)
    assert "tensors.npz[last_prompt_logits]: missing" in mismatches


def test_cli_runs_and_compares_one_case(tmp_path: Path) -> None:
    case = min(MODEL_CASES, key=lambda c: expected_of(c)["inputs_embeds"]["shape"][0])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cubeserve.tools.golden",
            str(GOLDEN / case),
            "--out",
            str(tmp_path),
            "--compare",
        ],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{case}: match" in done.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"expected.json", "tensors.npz"}


# --------------------------------------------------------------------------- frame sampling


@pytest.fixture(scope="module")
def sampling_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {case: run_case(GOLDEN / case, tmp_path_factory.mktemp(case)) for case in SAMPLING_CASES}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_frame_indices_and_timestamps(sampling_runs, case: str) -> None:
    produced = produced_of(sampling_runs[case])["results"]
    expected = expected_of(case)["results"]
    assert compare(GOLDEN / case, sampling_runs[case]) == []
    for want, got in zip(expected, produced, strict=True):
        assert got["frame_indices"] == got["sampled_frame_indices"]  # decoded what it sampled
        if "error" not in want:
            assert (got["frame_indices"], got["timestamps"]) == (
                want["frame_indices"],
                want["timestamps"],
            )


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_compare_reports_a_wrong_frame(sampling_runs, case: str, tmp_path: Path) -> None:
    produced = produced_of(sampling_runs[case])
    entry = next(e for e in produced["results"] if e["frame_indices"])
    entry["frame_indices"][-1] += 1
    (tmp_path / "expected.json").write_text(json.dumps(produced))
    (mismatch,) = compare(GOLDEN / case, tmp_path)
    assert ".frame_indices: first difference at" in mismatch


# --------------------------------------------------------------------------- README 7.1


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_fps_below_one_samples_one_frame_per_interval(sampling_runs, case: str) -> None:
    """The original raises IndexError; cubeserve takes the middle frame of every 1/fps seconds."""
    failed = [e for e in expected_of(case)["results"] if "error" in e]
    if not failed:
        pytest.skip("no request the original failed")
    produced = produced_of(sampling_runs[case])["results"]
    for want in failed:
        got = next(
            e for e in produced if (e["num_frames"], e["fps"]) == (want["num_frames"], want["fps"])
        )
        stamps = np.array(got["timestamps"])
        assert len(stamps) == want["num_frames"]
        assert np.all(np.diff(stamps) > 0)
        intervals = stamps * want["fps"] - 0.5  # interval k has its middle at (k + 0.5) / fps
        np.testing.assert_allclose(intervals, np.round(intervals), atol=0.1 * want["fps"])


@pytest.fixture(scope="module")
def video_engine() -> tuple[TracingEngine, str]:
    if not VIDEO_CASES:
        pytest.skip("no video golden case")
    case = VIDEO_CASES[0]
    return TracingEngine(
        GOLDEN / case / "model", chat_template=request_of(case)["conv_template"]
    ), case


def video_request(frames: np.ndarray, question: str, **video_fields) -> list[dict]:
    part = {"type": "video", "video": frames, **video_fields}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def case_frames(case: str) -> np.ndarray:
    return np.load(GOLDEN / case / "input" / request_of(case)["frames_file"])


def assert_generated(engine: TracingEngine, trace: RequestTrace, max_new_tokens: int) -> None:
    """The request ran to the end: greedy tokens from the recorded logits, one embedding row per
    text token and ``num_queries`` rows per visual placeholder."""
    assert 1 <= len(trace.output_ids) <= max_new_tokens
    assert trace.step_logits.argmax(dim=-1).tolist() == trace.output_ids
    extra_rows = (engine.scheduler.mm_encoder.num_queries - 1) * trace.layout_ids.count(P)
    assert len(trace.inputs_embeds) == len(trace.layout_ids) + extra_rows


def test_one_frame_video_is_one_cube(video_engine) -> None:
    """The original fails in cubing (no frame transition)."""
    engine, case = video_engine
    trace = engine.generate(
        video_request(case_frames(case)[:1], "What is this?", timestamps=[0.5]), 4
    )
    (video,) = trace.processed.media
    assert trace.frame_bounds == [[[0, 1]]]
    assert trace.cubing[0].z_logits.shape == (0, 2)
    assert trace.layout_ids.count(P) == 1 + video.has_thumbnail
    assert_generated(engine, trace, 4)


def test_video_without_timestamps_is_dated_at_one_fps(video_engine) -> None:
    """The original raises TypeError; cubeserve dates frame i at i seconds."""
    engine, case = video_engine
    frames = case_frames(case)[:6]
    undated = engine.generate(video_request(frames, "When?"), 4)
    assert undated.processed.media[0].timestamps == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert "0.0<image>1.0<image>2.0<image>" in undated.processed.prompt
    dated = engine.generate(
        video_request(frames, "When?", timestamps=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), 4
    )
    assert undated.processed.input_ids == dated.processed.input_ids
    assert undated.output_ids == dated.output_ids
    assert_generated(engine, undated, 4)


def test_literal_pad_token_keeps_the_whole_prompt(video_engine) -> None:
    """The original's cube merge stops at a typed pad token and drops the rest of the prompt."""
    engine, case = video_engine
    pad = engine.tokenizer.pad_token
    if pad is None:
        pytest.skip("the tokenizer has no pad token")
    question = f"Is {pad} a pad token? Then answer <image> this."
    trace = engine.generate(
        video_request(case_frames(case)[:8], question, timestamps=[float(i) for i in range(8)]), 4
    )
    last = len(trace.layout_ids) - trace.layout_ids[::-1].index(P)
    tail = engine.tokenizer.decode(trace.layout_ids[last:])
    assert question in tail and tail.endswith(engine.processor.template.assistant_role)
    assert (
        trace.layout_ids.count(P)
        == len(trace.frame_bounds[0]) + trace.processed.media[0].has_thumbnail
    )
    assert_generated(engine, trace, 4)


def test_llama3_images_with_different_view_counts() -> None:
    """The original Llama-3 chat path crashes on images whose anyres view counts differ."""
    if not LLAMA_CASES:
        pytest.skip("no llama3 golden case")
    case = LLAMA_CASES[0]
    engine = TracingEngine(GOLDEN / case / "model", chat_template=request_of(case)["conv_template"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(70, 44), (30, 100)]]
    parts = [{"type": "image", "image": image} for image in images]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare them."}]}]
    trace = engine.generate(messages, 4)
    views = [item.num_views for item in trace.processed.media]
    assert len(set(views)) == 2
    assert trace.layout_ids.count(P) == sum(views)
    assert_generated(engine, trace, 4)


@pytest.mark.parametrize("n_layers", [0, 2])
def test_cubing_vit_forward_n_layers_is_ignored(n_layers: int, tmp_path: Path) -> None:
    """Only -1 (all layers) was released; the original skips a layer for n > 0 and crashes for 0.
    cubeserve always runs the whole tower, so such configs give the released results."""
    if not VIDEO_CASES:
        pytest.skip("no video golden case")
    case = min(VIDEO_CASES, key=lambda c: request_of(c)["frames_shape"][0])
    model_dir = Path(shutil.copytree(GOLDEN / case / "model", tmp_path / "model"))
    config = read_json(model_dir / "config.json")
    config["cubing_vit_forward_n_layers"] = n_layers
    (model_dir / "config.json").write_text(json.dumps(config))
    out_dir = run_case(GOLDEN / case, tmp_path / "out", model_dir=model_dir)
    assert compare(GOLDEN / case / "expected", out_dir) == []
