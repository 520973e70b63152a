"""Per-request sampling options (SGLang / OpenAI semantics).

Lifecycle: ``SamplingParams.from_dict(request_json)`` -> ``normalize()`` -> ``verify(vocab_size)``.
``verify`` raises ``ValueError`` naming the offending field, so the server can answer 400.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# OpenAI's documented ranges.
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None  # None: the rest of the context (as vLLM and SGLang do)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> additive bias

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling params: {unknown}")
        return cls(**d)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop]
        if isinstance(self.stop, list):
            return self.stop
        raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")

    def normalize(self) -> SamplingParams:
        """Canonical form: ``stop`` is a list, greedy is ``top_k == 1``, bias keys are ints."""
        self.stop = self.stop_strings
        if self.temperature == 0.0:
            self.temperature, self.top_k = 1.0, 1
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
            # JSON object keys arrive as strings.
            self.logit_bias = {_as_int("logit_bias key", k): v for k, v in self.logit_bias.items()}
        return self

    def max_new_tokens_within(self, prompt_len: int, context_len: int) -> int:
        """``max_new_tokens``, by default what the context leaves after the prompt; raises
        ``ValueError`` when the prompt and it do not fit in ``context_len`` tokens."""
        room = context_len - prompt_len
        if self.max_new_tokens is None:
            if room < 1:
                raise ValueError(
                    f"the prompt ({prompt_len} tokens) leaves no room for output in the context"
                    f" length ({context_len} tokens)"
                )
            return room
        if self.max_new_tokens > room:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({self.max_new_tokens})"
                f" exceeds the context length ({context_len} tokens)"
            )
        return self.max_new_tokens

    def verify(self, vocab_size: int) -> None:
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        _check_int("top_k", self.top_k)
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_inclusive=False)
        _check_number("frequency_penalty", self.frequency_penalty, low=-MAX_ABS_PENALTY, high=MAX_ABS_PENALTY)
        _check_number("presence_penalty", self.presence_penalty, low=-MAX_ABS_PENALTY, high=MAX_ABS_PENALTY)
        if self.seed is not None:
            _check_int("seed", self.seed)
        _check_int("n", self.n, low=1)
        self._verify_stop(vocab_size)
        for token_id, bias in (self.logit_bias or {}).items():
            _check_token_id("logit_bias", token_id, vocab_size)
            _check_number(f"logit_bias[{token_id}]", bias, low=-MAX_ABS_LOGIT_BIAS, high=MAX_ABS_LOGIT_BIAS)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")

    def _verify_stop(self, vocab_size: int) -> None:
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain non-empty strings, got {s!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, list):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids or []:
            _check_token_id("stop_token_ids", token_id, vocab_size)


def _as_int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_int(name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value:g}")


def _check_token_id(name: str, token_id: Any, vocab_size: int) -> None:
    _check_int(name, token_id)
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name} has token id {token_id} outside the vocabulary [0, {vocab_size})")
