"""Request and response models: the OpenAI API subset cubeserve serves, and SGLang's ``/generate``.

Requests reject unknown fields (``extra="forbid"``) so a client relying on an unsupported
OpenAI feature gets a 400 naming the field instead of a silently different answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_CHOICES = 128  # the OpenAI API's limit on ``n``
MAX_TOP_LOGPROBS = 20

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- chat messages


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageURL(RequestModel):
    url: NonEmptyStr  # data: URL, file:// URL or a path under --allowed-local-media-path
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(RequestModel):
    url: NonEmptyStr
    fps: Annotated[float, Field(gt=0)] | None = None
    max_frames: Annotated[int, Field(ge=1)] | None = None


class VideoPart(RequestModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]

    @field_validator("content")
    @classmethod
    def _media_only_from_user(cls, content: Any, info: ValidationInfo) -> Any:
        has_media = isinstance(content, list) and any(not isinstance(part, TextPart) for part in content)
        if has_media and info.data.get("role") != "user":
            raise ValueError("image_url and video_url parts are only allowed in user messages")
        return content


class StreamOptions(RequestModel):
    include_usage: bool = False


# --------------------------------------------------------------------------- requests


def _reject_unless_default(value: Any, default: Any, name: str) -> Any:
    if value != default:
        raise ValueError(f"{name} is not supported by this server")
    return value


class SamplingRequest(RequestModel):
    """Fields shared by chat and text completions; SGLang's extra sampling fields included."""

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, top_k: int | None) -> int | None:
        if top_k is not None and top_k != -1 and top_k < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return top_k

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self) -> dict[str, Any]:
        """The SGLang ``sampling_params`` dict; unset fields keep the engine's defaults."""
        optional = (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty", "seed", "stop", "stop_token_ids", "logit_bias",
        )
        params: dict[str, Any] = {name: getattr(self, name) for name in optional if getattr(self, name) is not None}
        params.update(
            n=self.n,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )
        if self.max_new_tokens is not None:
            params["max_new_tokens"] = self.max_new_tokens
        return params


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    return_cubes: bool = False  # Quicksviewer: also return the cube segmentation of each video

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list | None) -> list | None:
        return _reject_unless_default(tools or None, None, "tools")

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, tool_choice: Any) -> Any:
        return _reject_unless_default(tool_choice if tool_choice != "none" else None, None, "tool_choice")

    @field_validator("response_format")
    @classmethod
    def _text_response_format_only(cls, response_format: dict | None) -> dict | None:
        if response_format is not None and response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return response_format

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = NonEmptyStr | Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        return _reject_unless_default(echo, False, "echo")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        return _reject_unless_default(suffix, None, "suffix")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        return _reject_unless_default(best_of if best_of != 1 else None, None, "best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt of a batched request."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class GenerateRequest(RequestModel):
    """SGLang's native ``/generate`` body; a list of texts or of id lists is a batch."""

    text: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | None = None
    input_ids: (
        Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
        | None
    ) = Field(None, validate_default=True)
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    rid: str | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("sampling_params")
    @classmethod
    def _check_n(cls, params: dict[str, Any]) -> dict[str, Any]:
        # The engine validates the rest; ``n`` is needed here already, to admit the request.
        n = params.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")
        return params

    @field_validator("input_ids")
    @classmethod
    def _exactly_one_input(cls, input_ids: Any, info: ValidationInfo) -> Any:
        if (input_ids is None) == (info.data.get("text") is None):
            raise ValueError("exactly one of text and input_ids must be given")
        return input_ids

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or bool(self.input_ids and isinstance(self.input_ids[0], list))

    def prompts(self) -> list[str | list[int]]:
        if self.is_batch:
            return list(self.text if self.text is not None else self.input_ids)
        return [self.text if self.text is not None else self.input_ids]


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "abort"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    matched_stop: int | str | None = None  # SGLang: the stop string or token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    cubes: list[Any] | None = None  # with return_cubes: the cube segments of each video


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    cubes: list[Any] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None


class CompletionResponse(BaseModel):
    """Both the full response and, with ``stream``, each chunk (as in the OpenAI API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cubeserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
