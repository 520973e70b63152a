"""The built-in tiny demo checkpoint: random Qwen2 weights and a locally trained byte-level BPE.

It lets every command run with no download (``--model-path`` omitted). The text is gibberish;
the point is exercising the whole serving path. Everything is seeded, so two builds are
identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cubeserve.engine.chat_template import CHATML
from cubeserve.engine.tokenizer import load_tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEMO_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEMO_BPE_MAX_VOCAB_SIZE = 1024  # an upper bound: the small corpus yields about 430 tokens
DEMO_SEED = 0
# Qwen2's pre-tokenizer split; transformers rebuilds this pipeline when it loads a Qwen2 tokenizer.
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
DEMO_TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

DEMO_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A serving engine batches many requests together so the accelerator stays busy.
Each request brings a prompt, and the model answers one token at a time.
The scheduler decides which requests run next and how much memory each one may use.
Prefix caching lets requests that share the beginning of a prompt reuse earlier work.
Video understanding models read frames, group them into cubes, and describe what happens.
Hello! How are you today? I am fine, thank you. What would you like to know?
Please summarize the following paragraph in one short sentence.
Once upon a time there was a little robot who wanted to learn how to paint.
It practiced every morning, mixing colors and drawing the mountains near its home.
The weather is sunny with a light breeze, and the temperature is about twenty degrees.
Numbers such as 1, 2, 3, 42, 100 and 2024 appear in text more often than you might think.
Water boils at one hundred degrees Celsius at sea level and freezes at zero.
The library opens at nine in the morning and closes at six in the evening.
She said that the meeting had been moved to Thursday afternoon because of the holiday.
Good questions often lead to better answers, and careful reading saves time later.
The system prompt tells the assistant how to behave during the conversation.
User: Can you describe the video? Assistant: A person walks a dog along the beach.
Computers store text as bytes, and a tokenizer turns those bytes into numbers.
When the answer is complete, the model writes an end of turn token and stops.
"""


def default_demo_dir() -> Path:
    cache = os.environ.get("CUBESERVE_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "cubeserve"
    return root / "demo-model"


def ensure_demo_model(path: str | os.PathLike[str] | None = None) -> str:
    """Directory of the demo checkpoint, written on first use (atomically: temp dir + rename)."""
    target = Path(path).expanduser() if path is not None else default_demo_dir()
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = write_demo_tokenizer(staging)
        write_demo_text_model(staging, tokenizer)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def write_demo_tokenizer(
    directory: str | os.PathLike[str], extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerBase:
    """Train a Qwen2-style byte-level BPE (well under a second), save it with a ChatML template,
    and return it as ``AutoTokenizer`` loads it."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_BPE_MAX_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[*DEMO_SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, *extra_special_tokens],
        chat_template=CHATML,
    )
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    return load_tokenizer(directory)


def write_demo_text_model(directory: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """Seeded random fp32 ``Qwen2ForCausalLM`` sized to ``tokenizer``, plus generation_config.json."""
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        eos_token_id=im_end,
        pad_token_id=endoftext,
        dtype="float32",
        **DEMO_TEXT_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
    model.save_pretrained(str(directory))


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _publish(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)  # also replaces an empty ``target`` directory
    except OSError:
        if not _is_complete(target):  # otherwise a concurrent writer finished first
            raise
