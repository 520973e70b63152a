"""Quicksviewer vision path, config and checkpoint conversion against the golden cases."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
if not GOLDEN.is_dir():
    pytest.skip(f"golden cases not found at {GOLDEN}", allow_module_level=True)

from transformers import AutoConfig, SiglipVisionConfig

from cubeserve.bench.video import interpolate_token_grid
from cubeserve.configs import QuicksviewerConfig, load_quicksviewer_config
from cubeserve.models.quicksviewer_vision import (
    QuicksviewerVisionEncoder,
    is_vision_weight,
    num_cube_boundaries,
    original_to_cubeserve_name,
    plan_segment_groups,
)
from cubeserve.models.siglip import SiglipVisionEmbeddings, resize_token_grid
from cubeserve.tools.convert import convert, source_weight_files

TOWER_ATOL = 1e-4
Z_ATOL = 1e-4
Y_ATOL = 2e-5
EMBEDS_ATOL = 1e-4
BATCHING_ATOL = 1e-5


def _modality(case_dir: Path) -> str:
    return json.loads((case_dir / "expected" / "expected.json").read_text())["modality"]


def _cases(*modalities: str) -> list[str]:
    found = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected" / "expected.json").is_file())
    return [name for name in found if _modality(GOLDEN / name) in modalities]


VIDEO_CASES = _cases("video")
IMAGE_CASES = _cases("image")
VISUAL_CASES = VIDEO_CASES + IMAGE_CASES


@dataclass
class Case:
    config: QuicksviewerConfig
    encoder: QuicksviewerVisionEncoder
    arrays: dict[str, np.ndarray]
    expected: dict
    tower_features: torch.Tensor
    blocks: torch.Tensor  # visual feature blocks in inputs_embeds order
    video: object | None  # VideoEncoding for video cases


def _load_encoder(model_dir: Path) -> QuicksviewerVisionEncoder:
    config = load_quicksviewer_config(model_dir)
    encoder = QuicksviewerVisionEncoder(config).float().eval()
    weights = {}
    for path in source_weight_files(model_dir):
        weights.update(load_file(str(path)))
    encoder.load_weights((name, tensor.float()) for name, tensor in weights.items())
    return encoder


@functools.cache
def load_case(name: str) -> Case:
    case_dir = GOLDEN / name
    encoder = _load_encoder(case_dir / "model")
    with np.load(case_dir / "expected" / "tensors.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    expected = json.loads((case_dir / "expected" / "expected.json").read_text())
    pixel_values = torch.from_numpy(arrays["pixel_values"])
    tower = encoder.tower_features(pixel_values)
    video = None
    if expected["modality"] == "video":
        video = encoder.encode_video(pixel_values)
        blocks = video.features
    else:
        blocks = encoder.encode_images(pixel_values)
    return Case(encoder.config, encoder, arrays, expected, tower, blocks, video)


def _max_err(actual: torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape
    return (actual.float() - expected.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- golden cases


@pytest.mark.parametrize("name", VISUAL_CASES)
def test_vision_tower_first_frame(name: str) -> None:
    case = load_case(name)
    assert tuple(case.tower_features.shape[1:]) == tuple(case.expected["vision_tower_out_shape_per_image"])
    assert _max_err(case.tower_features[0], case.arrays["vision_tower_out_first"]) <= TOWER_ATOL


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_vision_tower_chunking() -> None:
    case = load_case(VIDEO_CASES[0])
    tower = case.encoder.vision_tower
    default_batch = tower.max_batch_size
    tower.max_batch_size = 7
    try:
        chunked = case.encoder.tower_features(torch.from_numpy(case.arrays["pixel_values"]))
    finally:
        tower.max_batch_size = default_batch
    assert _max_err(chunked, case.tower_features) <= BATCHING_ATOL


@pytest.mark.parametrize("grid", [27, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_grid_resize_is_bilinear_interpolation(grid: int, dtype: torch.dtype) -> None:
    """The matmul resize computes F.interpolate's bilinear map; 27 -> 24 (SigLIP-so400m at
    384 px) has weights exact in bf16, so bf16 results are identical there."""
    tokens = torch.randn(3, grid * grid, 40, generator=torch.Generator().manual_seed(grid)).to(dtype)
    resized = resize_token_grid(tokens, grid, 24)
    expected = interpolate_token_grid(tokens, grid, 24)
    assert resized.shape == (3, 576, 40) and resized.dtype == dtype
    if dtype == torch.bfloat16 and grid == 27:
        assert torch.equal(resized, expected)
    else:
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # one bf16 ulp at |x| < 4
        assert _max_err(resized, expected) <= tolerance
    assert resize_token_grid(tokens, 24, 24) is tokens


def test_patch_tokens_are_contiguous() -> None:
    """A transposed layout out of the patch embedding would run every residual add and
    LayerNorm of the tower through strided copies (a third of its H100 time)."""
    config = SiglipVisionConfig(hidden_size=32, image_size=56, patch_size=14, num_channels=3)
    embeddings = SiglipVisionEmbeddings(config)
    assert embeddings(torch.randn(2, 3, 56, 56)).is_contiguous()


@pytest.mark.parametrize("name", VIDEO_CASES)
def test_cubing(name: str) -> None:
    case = load_case(name)
    cubing = case.expected["video"]["cubing"]
    assert num_cube_boundaries(case.tower_features.shape[0]) == cubing["num_boundaries_topk"]
    assert _max_err(case.video.z_logits, case.arrays["cubing_z_logits"]) <= Z_ATOL
    assert _max_err(case.video.y_prob, case.arrays["cubing_y_prob"]) <= Y_ATOL
    assert case.video.frame_bounds == [tuple(b) for b in cubing["frame_bounds"]]
    assert case.video.start_frames == [0] + cubing["boundary_frames"]


@pytest.mark.parametrize("name", VISUAL_CASES)
def test_visual_blocks_match_inputs_embeds(name: str) -> None:
    case = load_case(name)
    embeds = case.arrays["inputs_embeds"]
    visual = [s for s in case.expected["inputs_embeds"]["segments"] if s["kind"] == "visual"]
    assert len(visual) == case.blocks.shape[0]
    for segment in visual:
        block = case.blocks[segment["feature_index"]]
        rows = embeds[segment["start"] : segment["end"]]
        assert _max_err(block, rows) <= EMBEDS_ATOL, segment["source"]


# ---------------------------------------------------------------------------------------------- batching


def _video_case_with_most_cubes() -> str:
    return max(VIDEO_CASES, key=lambda n: len(load_case(n).video.frame_bounds))


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_batched_resampler_matches_per_cube_loop() -> None:
    case = load_case(_video_case_with_most_cubes())
    resampler = case.encoder.resampler
    bounds = case.video.frame_bounds
    assert len({e - s for s, e in bounds}) > 1, "want cubes of different lengths"
    times = torch.arange(case.tower_features.shape[0])
    with torch.no_grad():
        batched = resampler(case.tower_features, bounds, times)
        per_cube = torch.cat([resampler(case.tower_features, [b], times) for b in bounds])
    assert _max_err(batched, per_cube) <= BATCHING_ATOL

    # A tight token budget splits the cubes into several padded groups; the result must not change.
    lengths = [e - s for s, e in bounds]

    def has_padded_group(budget: int) -> bool:
        groups = plan_segment_groups(lengths, budget)
        return len(groups) > 1 and any(len({lengths[i] for i in group}) > 1 for group in groups)

    budget_frames = next((b for b in range(2, sum(lengths)) if has_padded_group(b)), None)
    if budget_frames is None:
        pytest.skip("cube lengths do not allow a padded multi-group split")
    default_budget = resampler.max_tokens_per_call
    resampler.max_tokens_per_call = budget_frames * 576
    try:
        with torch.no_grad():
            grouped = resampler(case.tower_features, bounds, times)
    finally:
        resampler.max_tokens_per_call = default_budget
    assert _max_err(grouped, per_cube) <= BATCHING_ATOL


def test_plan_segment_groups_respects_budget() -> None:
    lengths = [3, 9, 1, 5, 5, 2]
    groups = plan_segment_groups(lengths, max_frames=10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 10


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_encode_videos_matches_single_videos() -> None:
    case = load_case(VIDEO_CASES[0])
    pixel_values = torch.from_numpy(case.arrays["pixel_values"])
    first, second = case.encoder.encode_videos([pixel_values, pixel_values[:7]])
    assert first.frame_bounds == case.video.frame_bounds
    assert _max_err(first.features, case.video.features) <= BATCHING_ATOL
    alone = case.encoder.encode_video(pixel_values[:7])
    assert second.frame_bounds == alone.frame_bounds
    assert _max_err(second.features, alone.features) <= BATCHING_ATOL


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
@pytest.mark.parametrize("num_frames", [1, 2])
def test_short_videos(num_frames: int) -> None:
    case = load_case(VIDEO_CASES[0])
    pixel_values = torch.from_numpy(case.arrays["pixel_values"][:num_frames])
    video = case.encoder.encode_video(pixel_values)
    num_cubes = 1 if num_frames == 1 else 2
    expected_bounds = [(0, 1)] if num_frames == 1 else [(0, 1), (1, 2)]
    assert video.frame_bounds == expected_bounds
    assert tuple(video.z_logits.shape) == (num_frames - 1, 2)
    blocks = num_cubes + int(case.config.mm_use_thumbnail)
    assert tuple(video.features.shape) == (blocks, case.config.num_queries, case.config.hidden_size)
    assert torch.isfinite(video.features).all()
    if num_frames == 1:
        # One frame: the single cube is that frame at temporal index 0, like an image view.
        image_block = case.encoder.encode_images(pixel_values)
        assert _max_err(video.cube_features, image_block) <= BATCHING_ATOL


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_warm_up_encodes_a_blank_video(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = load_case(VIDEO_CASES[0]).encoder
    encoded: list[torch.Tensor] = []
    monkeypatch.setattr(encoder, "encode_video", encoded.append)
    encoder.warm_up(5)
    size = encoder.config.vision_config.image_size
    ((frames,),) = [encoded]
    assert frames.shape == (5, 3, size, size) and frames.dtype == torch.float32
    assert not frames.any()


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_half_precision_smoke() -> None:
    case = load_case(VIDEO_CASES[0])
    encoder = _load_encoder(GOLDEN / VIDEO_CASES[0] / "model").to(torch.bfloat16)
    pixel_values = torch.from_numpy(case.arrays["pixel_values"][:8])
    video = encoder.encode_video(pixel_values)
    assert video.features.dtype == torch.bfloat16
    assert video.z_logits.dtype == torch.float32
    assert torch.isfinite(video.features.float()).all()
    assert encoder.encode_images(pixel_values[:2]).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- config + conversion


def test_weight_name_mapping() -> None:
    tower = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert original_to_cubeserve_name(tower) == "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert original_to_cubeserve_name("model.vision_resampler.attn.in_proj_weight") == "resampler.attn.in_proj_weight"
    assert original_to_cubeserve_name("model.cubing.proj_fn.3.bias") == "cubing.fc2.bias"
    assert original_to_cubeserve_name("model.cubing.thumbnail_fn.1.weight") == "thumbnail.proj.weight"
    lm_names = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    for lm_name in lm_names:
        assert original_to_cubeserve_name(lm_name) == lm_name
        assert not is_vision_weight(lm_name)
    assert original_to_cubeserve_name("resampler.query") == "resampler.query"
    with pytest.raises(ValueError):
        original_to_cubeserve_name("model.cubing.unknown.weight")


def _one_case_per_backbone() -> list[str]:
    by_backbone: dict[str, str] = {}
    for name in _cases("video", "image", "text"):
        raw = json.loads((GOLDEN / name / "model" / "config.json").read_text())
        by_backbone.setdefault(raw["model_type"], name)
    return sorted(by_backbone.values())


@pytest.mark.parametrize("name", _one_case_per_backbone())
def test_config_round_trip(name: str, tmp_path: Path) -> None:
    src = GOLDEN / name / "model"
    original = load_quicksviewer_config(src)
    raw = json.loads((src / "config.json").read_text())
    assert original.resampler_num_heads == raw["num_heads"]
    assert original.num_queries == raw["num_queries"]
    assert original.text_config.hidden_size == raw["hidden_size"]
    preprocessor = json.loads((src / raw["mm_vision_tower"] / "preprocessor_config.json").read_text())
    assert original.image_size == preprocessor["size"]["height"]
    tower = json.loads((src / raw["mm_vision_tower"] / "config.json").read_text())
    assert original.vision_config.hidden_size == tower["hidden_size"]

    convert(src, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "quicksviewer"
    assert written["architectures"] == ["QuicksviewerForCausalLM"]
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, QuicksviewerConfig)
    assert isinstance(load_quicksviewer_config(tmp_path), QuicksviewerConfig)
    assert loaded.text_config.model_type == original.text_config.model_type
    assert loaded.text_config.to_dict() == original.text_config.to_dict()
    assert loaded.vision_config.to_dict() == original.vision_config.to_dict()
    for field in ("image_size", "image_grid_pinpoints", "num_queries", "resampler_num_heads", "mm_use_thumbnail",
                  "video_start_token_id", "thumbnail_end_token_id", "im_start_token_id", "patch_end_token_id",
                  "eos_token_id", "bos_token_id", "pad_token_id", "conv_template", "video_num_frames", "video_fps"):
        assert getattr(loaded, field) == getattr(original, field), field
    for file in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / file).is_file()


@pytest.mark.skipif(not VIDEO_CASES, reason="no video golden case")
def test_convert_then_load_gives_identical_features(tmp_path: Path) -> None:
    name = VIDEO_CASES[0]
    case = load_case(name)
    convert(GOLDEN / name / "model", tmp_path, max_shard_bytes=256 * 1024)  # several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    converted = _load_encoder(tmp_path)
    pixel_values = torch.from_numpy(case.arrays["pixel_values"])
    video = converted.encode_video(pixel_values)
    assert video.frame_bounds == case.video.frame_bounds
    assert torch.equal(video.features, case.video.features)
    src_state = case.encoder.state_dict()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, src_state[key]), key


def test_missing_required_special_token(tmp_path: Path) -> None:
    src = GOLDEN / _one_case_per_backbone()[0] / "model"
    for item in src.iterdir():
        if item.name != "model.safetensors":
            (shutil.copytree if item.is_dir() else shutil.copyfile)(item, tmp_path / item.name)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<video_start>"]
    tokenizer["model"]["vocab"].pop("<video_start>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))

    raw = json.loads((src / "config.json").read_text())
    raw["mm_use_video_start_end"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="<video_start>"):
        load_quicksviewer_config(tmp_path)

    raw["mm_use_video_start_end"] = False
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_quicksviewer_config(tmp_path)
    assert config.video_start_token_id is None
    assert config.mm_use_video_start_end is False
