"""OpenAI-style chat messages -> prompt text, through a jinja chat template.

A template is a built-in name (``BUILTIN_TEMPLATES``), a path to a .jinja file, or ``None`` for
the tokenizer's own ``chat_template``. Rendering goes through the tokenizer so that templates see
the usual variables (``bos_token``, ``add_generation_prompt``, ``raise_exception``...).

Templates that write the BOS token themselves (``llama_3``) expect the prompt to be tokenized
with ``add_special_tokens=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

ALLOWED_ROLES = ("system", "user", "assistant", "tool")

CHATML = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_3 = (
    r"{{ bos_token }}"
    r"{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r" + message['content'] | trim + '<|eot_id|>' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "qwen2": CHATML,
    "llama_3": LLAMA_3,
    "llama_3_chat": LLAMA_3,
}


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str:
    """The jinja source for ``template`` (built-in name, .jinja path, or None: the tokenizer's)."""
    if template is None:
        if not tokenizer.chat_template:
            raise ValueError(
                "the tokenizer has no chat_template; pass --chat-template with a .jinja file "
                f"or one of {sorted(BUILTIN_TEMPLATES)}"
            )
        return tokenizer.chat_template
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"chat template {template!r} is neither a built-in ({sorted(BUILTIN_TEMPLATES)}) nor an existing file"
    )


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    source = resolve_chat_template(tokenizer, template)
    conversation = [_text_only_message(message) for message in messages]
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e


def _text_only_message(message: dict[str, Any]) -> dict[str, Any]:
    """Validated copy of ``message`` whose content is a string (its text parts, concatenated)."""
    if not isinstance(message, dict):
        raise ValueError(f"a message must be an object with 'role' and 'content', got {message!r}")
    role = message.get("role")
    if role not in ALLOWED_ROLES:
        raise ValueError(f"unsupported message role {role!r}; expected one of {list(ALLOWED_ROLES)}")
    return {**message, "content": _content_text(message.get("content"))}


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:  # e.g. an assistant message carrying only tool calls
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {content!r}")
    texts = []
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"a content part must be an object with a 'type', got {part!r}")
        if part["type"] == "text":
            texts.append(part.get("text", ""))
    return "".join(texts)
