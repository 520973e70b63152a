"""The built-in demo checkpoint (a tiny random Quicksviewer) and tokenizer loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factory import PagedHarness
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cubeserve.configs.quicksviewer import MM_SPECIAL_TOKENS, QuicksviewerConfig
from cubeserve.demo import (
    DEMO_MM_TOKENS,
    ENDOFTEXT,
    IM_END,
    default_demo_dir,
    ensure_demo_model,
    write_demo_tokenizer,
)
from cubeserve.engine.chat_template import apply_chat_template
from cubeserve.engine.model_runner import load_model_config
from cubeserve.engine.tokenizer import get_eos_token_ids, load_tokenizer
from cubeserve.models.quicksviewer import QuicksviewerForCausalLM
from cubeserve.models.registry import ModelRegistry
from cubeserve.models.weights import load_model
from cubeserve.multimodal.processors.quicksviewer import (
    IMAGE_PLACEHOLDER_ID,
    QuicksviewerProcessor,
)

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(ensure_demo_model(tmp_path_factory.mktemp("cache") / "demo"))


@pytest.fixture(scope="module")
def config(demo_dir: Path) -> QuicksviewerConfig:
    return load_model_config(demo_dir)


@pytest.fixture(scope="module")
def model(demo_dir: Path, config: QuicksviewerConfig) -> QuicksviewerForCausalLM:
    model_cls = ModelRegistry.resolve(config.architectures)
    return load_model(model_cls, config, demo_dir, torch.float32, "cpu")  # every parameter must load


def scene_frames(num_frames: int = 8) -> np.ndarray:
    """Two single-colour scenes, 48x64."""
    frames = np.zeros((num_frames, 48, 64, 3), np.uint8)
    frames[: num_frames // 2] = (200, 30, 30)
    frames[num_frames // 2 :] = (30, 30, 200)
    return frames


def test_checkpoint_files(demo_dir: Path) -> None:
    assert sorted(os.listdir(demo_dir)) == sorted(CHECKPOINT_FILES)
    assert [p.name for p in demo_dir.parent.iterdir()] == ["demo"]  # no staging directory left behind


def test_is_a_small_converted_quicksviewer(demo_dir: Path, config: QuicksviewerConfig) -> None:
    assert config.model_type == "quicksviewer" and config.architectures == ["QuicksviewerForCausalLM"]
    text, vision = config.text_config, config.vision_config
    assert text.model_type == "qwen2" and (text.hidden_size, text.num_hidden_layers) == (64, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (32, 28, 14)
    assert config.image_size == vision.image_size and config.num_queries == 64
    assert config.mm_use_thumbnail and config.conv_template == "qwen2"
    tokenizer = load_tokenizer(demo_dir)
    assert text.vocab_size == len(tokenizer)
    for field, token, flag in MM_SPECIAL_TOKENS:
        assert getattr(config, flag)
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token)
        assert getattr(config, field) in tokenizer.all_special_ids


def test_language_model_matches_transformers(
    demo_dir: Path, config: QuicksviewerConfig, model: QuicksviewerForCausalLM
) -> None:
    """The LM weights carry HF Qwen2 names: transformers reads them with the text config."""
    hf = AutoModelForCausalLM.from_pretrained(demo_dir, config=config.text_config, dtype=torch.float32).eval()
    ids = load_tokenizer(demo_dir).encode("Hello world, what happens in the video?")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    harness = PagedHarness(model.language_model)
    logits = harness.extend([harness.add_request()], [ids])[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # random weights of a useful scale, not near-uniform logits


def test_control_tokens_are_never_the_greedy_choice(demo_dir: Path) -> None:
    lm_head = load_file(demo_dir / "model.safetensors")["lm_head.weight"]
    special = load_tokenizer(demo_dir).all_special_ids
    assert not lm_head[special].any()
    assert lm_head.abs().sum(dim=1).count_nonzero() == lm_head.shape[0] - len(special)


def test_processes_and_encodes_video_and_image(demo_dir: Path, model: QuicksviewerForCausalLM) -> None:
    processor = QuicksviewerProcessor.from_pretrained(demo_dir)
    image = Image.fromarray(scene_frames(1)[0][:30])  # 64x30: anyres base view + 2 tiles
    processed = processor.process([{"role": "user", "content": [
        {"type": "video", "video": scene_frames(), "fps": 2},
        {"type": "image", "image": image},
        {"type": "text", "text": "What happens?"},
    ]}])
    assert "<video_start><thumbnail_start><image><thumbnail_end>0.0<image>0.5<image>" in processed.prompt
    assert "<im_start><patch_start><image><patch_end>" in processed.prompt
    video, picture = processed.media
    assert processed.input_ids.count(IMAGE_PLACEHOLDER_ID) == video.num_placeholders + picture.num_views
    encoded = model.vision.encode_video(video.pixel_values)
    assert encoded.frame_bounds[0][0] == 0 and encoded.frame_bounds[-1][1] == 8
    assert encoded.features.shape == (1 + encoded.num_cubes, 64, 64)
    views = model.vision.encode_images(picture.pixel_values)
    assert views.shape == (picture.num_views, 64, 64) and picture.num_views == 3
    for blocks in (encoded.features, views):
        assert torch.isfinite(blocks).all() and blocks.std() > 0.1


def test_tokenizer_round_trips_and_chat_template_applies(demo_dir: Path) -> None:
    tokenizer = load_tokenizer(demo_dir)
    text = "naïve 世界 <|im_start|>user"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer.all_special_ids
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for token in DEMO_MM_TOKENS:  # matched whole, before BPE
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == tokenizer.convert_tokens_to_ids(token)


def test_eos_ids_from_tokenizer_and_generation_config(demo_dir: Path, config: QuicksviewerConfig) -> None:
    tokenizer = load_tokenizer(demo_dir)
    assert tokenizer.eos_token == IM_END
    expected = set(tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT]))
    assert get_eos_token_ids(tokenizer, demo_dir) == expected == set(config.eos_token_id)
    assert get_eos_token_ids(tokenizer, None) == {tokenizer.eos_token_id}


def test_idempotent_and_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    weights = demo_dir / "model.safetensors"
    written_at = weights.stat().st_mtime_ns
    assert ensure_demo_model(demo_dir) == str(demo_dir)
    assert weights.stat().st_mtime_ns == written_at
    other = Path(ensure_demo_model(tmp_path / "again"))
    for name in CHECKPOINT_FILES:
        assert (other / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_default_dir_and_empty_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBESERVE_CACHE", str(tmp_path / "cache"))
    assert default_demo_dir() == tmp_path / "cache" / "demo-quicksviewer"
    empty = default_demo_dir()
    empty.mkdir(parents=True)
    assert ensure_demo_model() == str(empty)
    assert (empty / "model.safetensors").is_file()


def test_extra_special_tokens_for_multimodal_demos(tmp_path: Path) -> None:
    tokenizer = write_demo_tokenizer(tmp_path, extra_special_tokens=["<video>", "<image>"])
    ids = tokenizer.encode("a <video> b<image>", add_special_tokens=False)
    video, image = tokenizer.convert_tokens_to_ids(["<video>", "<image>"])
    assert video in ids and image in ids
    assert {video, image} <= set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a  b"
