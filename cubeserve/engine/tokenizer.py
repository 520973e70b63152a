"""Tokenizer loading (local files only, no remote code) and end-of-sequence ids."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

GENERATION_CONFIG = "generation_config.json"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def get_eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None) -> set[int]:
    """The tokenizer's eos id plus every ``eos_token_id`` in the model's generation_config.json
    (chat models often list several, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    eos_ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    config_path = Path(model_dir) / GENERATION_CONFIG if model_dir is not None else None
    if config_path is not None and config_path.is_file():
        configured = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(configured, int):
            eos_ids.add(configured)
        elif isinstance(configured, list):
            eos_ids.update(configured)
    return eos_ids
