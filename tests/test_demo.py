"""The built-in demo checkpoint and tokenizer loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cubeserve.demo import ENDOFTEXT, IM_END, default_demo_dir, ensure_demo_model, write_demo_tokenizer
from cubeserve.engine.chat_template import apply_chat_template
from cubeserve.engine.tokenizer import get_eos_token_ids, load_tokenizer

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(ensure_demo_model(tmp_path_factory.mktemp("cache") / "demo"))


def test_checkpoint_files(demo_dir: Path) -> None:
    assert sorted(os.listdir(demo_dir)) == sorted(CHECKPOINT_FILES)
    assert [p.name for p in demo_dir.parent.iterdir()] == ["demo"]  # no staging directory left behind


def test_loads_with_transformers_and_runs(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    assert model.config.model_type == "qwen2"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_chat_template_applies(demo_dir: Path) -> None:
    tokenizer = load_tokenizer(demo_dir)
    text = "naïve 世界 <|im_start|>user"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer.all_special_ids
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_eos_ids_from_tokenizer_and_generation_config(demo_dir: Path) -> None:
    tokenizer = load_tokenizer(demo_dir)
    assert tokenizer.eos_token == IM_END
    expected = set(tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT]))
    assert get_eos_token_ids(tokenizer, demo_dir) == expected
    assert get_eos_token_ids(tokenizer, None) == {tokenizer.eos_token_id}


def test_idempotent_and_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    weights = demo_dir / "model.safetensors"
    written_at = weights.stat().st_mtime_ns
    assert ensure_demo_model(demo_dir) == str(demo_dir)
    assert weights.stat().st_mtime_ns == written_at
    other = Path(ensure_demo_model(tmp_path / "again"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_default_dir_and_empty_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBESERVE_CACHE", str(tmp_path / "cache"))
    assert default_demo_dir() == tmp_path / "cache" / "demo-model"
    empty = tmp_path / "cache" / "demo-model"
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
