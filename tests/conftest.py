"""Test-session setup shared by every test module.

Triton picks its interpreter or its compiler when it is first imported, so the choice is made
here, before any test module imports it: without CUDA its kernels run through the interpreter
on CPU tensors (slowly; the Triton tests keep their shapes tiny).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything below imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model_factory import make_tiny_checkpoint
from transformers import PreTrainedTokenizerBase

from cubeserve.demo import write_demo_tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The demo model's byte-level BPE with its ChatML template."""
    return write_demo_tokenizer(tmp_path_factory.mktemp("demo-tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(family)``: a tiny random text checkpoint of ``family`` (one of
    ``model_factory.FAMILIES``) sized to the demo tokenizer, which it includes; written once."""
    paths: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in paths:
            path = tmp_path_factory.mktemp(family)
            tokenizer = write_demo_tokenizer(path)
            paths[family] = make_tiny_checkpoint(path, family, vocab_size=len(tokenizer))
        return paths[family]

    return get


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``CUBESERVE_CACHE`` for processes that run the demo model: it is built there once."""
    return tmp_path_factory.getbasetemp() / "cubeserve-cache"
