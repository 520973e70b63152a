"""Tokenizer loading (local files only, no remote code) and end-of-sequence ids."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerBase

GENERATION_CONFIG = "generation_config.json"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path``, built by the class its tokenizer_config names.

    ``AutoTokenizer`` would first build the model's config, which fails for model types
    transformers does not know (e.g. the original ``quicksviewer_*`` checkpoints).
    """
    path = Path(path)
    tokenizer_config = path / "tokenizer_config.json"
    cls_name = (
        json.loads(tokenizer_config.read_text(encoding="utf-8")).get("tokenizer_class")
        if tokenizer_config.is_file()
        else None
    )
    tokenizer_cls = getattr(transformers, cls_name, None) if cls_name else None
    if tokenizer_cls is None and (path / "tokenizer.json").is_file():
        tokenizer_cls = transformers.PreTrainedTokenizerFast
    if tokenizer_cls is None:
        tokenizer_cls = transformers.AutoTokenizer
    return tokenizer_cls.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


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
