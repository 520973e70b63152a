"""Chat templates: built-ins, .jinja files, the tokenizer's own, and message validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cubeserve.engine.chat_template import apply_chat_template

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
]
CHATML_EXPECTED = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def bare_tokenizer(demo_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A private copy of the demo tokenizer without a chat template (the session's stays whole)."""
    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("name", ["chatml", "qwen2"])
def test_builtin_chatml(bare_tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    assert apply_chat_template(bare_tokenizer, MESSAGES, name) == CHATML_EXPECTED


def test_without_generation_prompt(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    text = apply_chat_template(demo_tokenizer, MESSAGES, "chatml", add_generation_prompt=False)
    assert text == CHATML_EXPECTED.removesuffix("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["llama_3", "llama_3_chat"])
def test_builtin_llama_3(bare_tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    bare_tokenizer.bos_token = "<|endoftext|>"
    text = apply_chat_template(bare_tokenizer, [{"role": "user", "content": "  Hi!\n"}], name)
    assert text == (
        "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_template_file(bare_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    assert apply_chat_template(bare_tokenizer, MESSAGES, str(path)) == "[system] Be brief.\n[user] Hi!\n"


def test_tokenizer_own_template(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    assert apply_chat_template(demo_tokenizer, MESSAGES) == CHATML_EXPECTED


def test_missing_template_is_a_clear_error(bare_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="no chat_template.*--chat-template"):
        apply_chat_template(bare_tokenizer, MESSAGES)
    with pytest.raises(ValueError, match="neither a built-in"):
        apply_chat_template(bare_tokenizer, MESSAGES, "no_such_template")


def test_bad_role_is_named(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="'wizard'"):
        apply_chat_template(demo_tokenizer, [{"role": "wizard", "content": "hi"}])


def test_content_parts_keep_only_text(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "video_url", "video_url": {"url": "file:///x.mp4"}},
                {"type": "text", "text": "this."},
            ],
        },
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42"},
    ]
    text = apply_chat_template(demo_tokenizer, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\nDescribe this.<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="'type'"):
        apply_chat_template(demo_tokenizer, [{"role": "user", "content": [{"text": "untyped"}]}])


def test_template_errors_become_value_errors(bare_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "strict.jinja"
    path.write_text("{{ raise_exception('only one message allowed') }}", encoding="utf-8")
    with pytest.raises(ValueError, match="only one message allowed"):
        apply_chat_template(bare_tokenizer, MESSAGES, str(path))
