"""What every endpoint handler needs: the tokenizer manager, the served model, metrics, limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from cubeserve.engine.io_struct import EngineStats, GenerateReqInput
from cubeserve.server.limits import AdmissionControl
from cubeserve.server.metrics import ServerMetrics


class TokenizerManagerLike(Protocol):
    """The part of ``cubeserve.engine.tokenizer_manager.TokenizerManager`` the app uses.

    Closing a ``generate_request`` iterator early aborts the request in the engine.
    """

    async def shutdown(self) -> None: ...

    def generate_request(self, obj: GenerateReqInput) -> AsyncIterator[dict[str, Any]]: ...

    async def get_stats(self) -> EngineStats: ...

    def token_text(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str  # --served-model-name, else the model path
    path: str
    dtype: str
    context_length: int
    kv_capacity_tokens: int
    max_running_requests: int


@dataclass
class ServingContext:
    manager: TokenizerManagerLike
    model: ModelInfo
    metrics: ServerMetrics
    admission: AdmissionControl

    def token_text(self, token_id: int) -> str:
        return self.manager.token_text(token_id)
