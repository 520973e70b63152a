"""Streaming token -> text conversion and stop-string handling.

``IncrementalDetokenizer`` uses the prefix-offset / read-offset scheme of vLLM and SGLang: each
step decodes a short window twice, once without and once with the new tokens, and emits the
difference. Text ending in U+FFFD is held back, because the last token may have produced only
the first bytes of a multi-byte UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Longest UTF-8 character: a stop string of n characters spans at most this many byte tokens per character.
MAX_BYTES_PER_CHAR = 4


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids_tail: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        """``prompt_ids_tail``: the last few prompt tokens, so that the first output token is
        decoded in context (SentencePiece drops the leading space of a window's first token)."""
        self._tokenizer = tokenizer
        self._decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
            # Clean-up would rewrite text across window boundaries, so the deltas would not add up.
            "clean_up_tokenization_spaces": False,
        }
        # Only ids from ``prefix_offset`` on are ever decoded again, so older ones are dropped.
        self._ids: list[int] = list(prompt_ids_tail)
        self._prefix_offset = 0  # window start: decoded for context only
        self._read_offset = len(self._ids)  # text of ids before this has been emitted

    def step(self, new_ids: Sequence[int]) -> str:
        """Text completed by ``new_ids``; incomplete trailing characters wait for later tokens."""
        self._ids.extend(new_ids)
        prefix_text, full_text = self._window_texts()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Everything not yet emitted, incomplete characters included (call once, at the end)."""
        prefix_text, full_text = self._window_texts()
        self._advance()
        return full_text[len(prefix_text) :]

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        prefix = self._read_offset - self._prefix_offset
        decode = self._tokenizer.decode
        return decode(window[:prefix], **self._decode_kwargs), decode(window, **self._decode_kwargs)

    def _advance(self) -> None:
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._pending = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the matched stop string or None).

        On a match the emitted text ends right before the stop string; later calls emit nothing.
        """
        if self.matched is not None:
            return "", None
        text = self._pending + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._pending, self.matched = "", stop
            return text[:start], stop
        keep = self._partial_stop_suffix_len(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Held-back text, released when generation ends without a stop string."""
        text, self._pending = self._pending, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        found = [(index, stop) for stop in self._stops if (index := text.find(stop)) >= 0]
        return min(found, key=lambda match: match[0]) if found else None

    def _partial_stop_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def tail_contains_stop(
    tokenizer: PreTrainedTokenizerBase,
    output_ids: Sequence[int],
    stops: Sequence[str],
    max_stop_len: int,
    skip_special_tokens: bool = True,
) -> str | None:
    """The stop string found in the text of the last output tokens, or None.

    For the scheduler's per-step check: ``max_stop_len`` is the longest stop string's length in
    characters, and only the tokens that can overlap a stop string ending now are decoded (plus
    one token of left context).
    """
    if not stops or not output_ids:
        return None
    num_tokens = MAX_BYTES_PER_CHAR * max_stop_len + 1
    tail = tokenizer.decode(list(output_ids[-num_tokens:]), skip_special_tokens=skip_special_tokens)
    found = [(index, stop) for stop in stops if (index := tail.find(stop)) >= 0]
    return min(found, key=lambda match: match[0])[1] if found else None
