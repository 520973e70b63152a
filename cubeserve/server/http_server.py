"""The FastAPI app (OpenAI-compatible and SGLang-native endpoints) and ``serve``, which starts
the engine process and runs the app under uvicorn with graceful shutdown.

``create_app`` takes an already started tokenizer manager (``ServingContext``) so tests can
inject a fake one; the app owns it from then on and shuts it down when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from cubeserve import __version__
from cubeserve.demo import DEMO_MODEL_NAME
from cubeserve.engine.io_struct import EngineStats, GenerateReqInput
from cubeserve.engine.tokenizer_manager import TokenizerManager
from cubeserve.server.auth import ApiKeyMiddleware
from cubeserve.server.context import ModelInfo, ServingContext
from cubeserve.server.errors import APIError, install_error_handlers
from cubeserve.server.limits import AdmissionControl, BodySizeLimitMiddleware
from cubeserve.server.metrics import CONTENT_TYPE, HttpMetricsMiddleware, ServerMetrics
from cubeserve.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, ModelCard, ModelList
from cubeserve.server.serving_chat import create_chat_completion
from cubeserve.server.serving_common import run_to_completion
from cubeserve.server.serving_completions import create_completion
from cubeserve.server.serving_generate import generate_native
from cubeserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/generate",
    "/health", "/health_generate", "/metrics",
})
ENGINE_PROBE_TIMEOUT_S = 20.0  # /health_generate and /metrics give up on a stuck engine
DRAIN_TIMEOUT_S = 60.0  # on SIGTERM, running requests get this long to finish


def get_ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


Ctx = Annotated[ServingContext, Depends(get_ctx)]


async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: Ctx) -> Response:
    return await create_chat_completion(ctx, body, request)


async def completions(body: CompletionRequest, request: Request, ctx: Ctx) -> Response:
    return await create_completion(ctx, body, request)


async def generate(body: GenerateRequest, request: Request, ctx: Ctx) -> Response:
    return await generate_native(ctx, body, request)


def _model_card(ctx: ServingContext, created: int) -> ModelCard:
    return ModelCard(id=ctx.model.name, created=created, root=ctx.model.path, max_model_len=ctx.model.context_length)


async def list_models(request: Request, ctx: Ctx) -> ModelList:
    return ModelList(data=[_model_card(ctx, request.app.state.started_at)])


async def retrieve_model(model_id: str, request: Request, ctx: Ctx) -> ModelCard:
    if model_id != ctx.model.name:
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return _model_card(ctx, request.app.state.started_at)


async def _engine_stats(ctx: ServingContext) -> EngineStats:
    """The engine's state; a 503 if it does not answer in time (dead or stuck)."""
    try:
        # shield: on timeout the reply is still awaited (and dropped), not left unclaimed.
        return await asyncio.wait_for(asyncio.shield(ctx.manager.get_stats()), ENGINE_PROBE_TIMEOUT_S)
    except TimeoutError:
        raise APIError(503, f"the engine did not answer within {ENGINE_PROBE_TIMEOUT_S:g}s") from None


async def health(ctx: Ctx) -> Response:
    """Liveness: the engine process answers."""
    await _engine_stats(ctx)
    return Response(status_code=200)


async def health_generate(request: Request, ctx: Ctx) -> Response:
    """Liveness of the whole path: one greedy token through tokenizer manager and engine."""
    probe = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
    try:
        await asyncio.wait_for(run_to_completion(ctx, request, [probe], admit=False), ENGINE_PROBE_TIMEOUT_S)
    except TimeoutError:
        raise APIError(503, f"the engine did not generate a token within {ENGINE_PROBE_TIMEOUT_S:g}s") from None
    return Response(status_code=200)


async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.render(await _engine_stats(ctx)), media_type=CONTENT_TYPE)


def create_app(ctx: ServingContext, server_args: ServerArgs) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.manager.shutdown()  # uvicorn gets here after draining the requests in flight

    app = FastAPI(title="cubeserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.started_at = int(time.time())
    install_error_handlers(app)

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/generate", generate, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health_generate", health_generate, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])

    # Added innermost first: requests pass metrics -> auth -> body limit -> routes.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=server_args.max_request_bytes)
    if server_args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_args.api_key)
    app.add_middleware(HttpMetricsMiddleware, metrics=ctx.metrics, endpoints=ENDPOINTS)
    return app


class StartupError(Exception):
    """The server could not start; the message says why (no traceback needed)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bound before the model loads, so a busy port fails in a second, not after minutes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def build_context(manager: TokenizerManager, server_args: ServerArgs) -> ServingContext:
    info = manager.info
    model = ModelInfo(
        name=server_args.served_model_name
        or (DEMO_MODEL_NAME if server_args.model_path is None else info.model_path),
        path=info.model_path,
        dtype=info.dtype,
        context_length=info.context_len,
        kv_capacity_tokens=info.kv_capacity_tokens,
        max_running_requests=info.max_running_requests,
    )
    admission = AdmissionControl(model.max_running_requests + server_args.max_queued_requests)
    return ServingContext(manager=manager, model=model, metrics=ServerMetrics(), admission=admission)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(server_args: ServerArgs) -> None:
    """Start the engine, then serve HTTP until SIGTERM / SIGINT, draining requests in flight."""
    sock = bind_socket(server_args.host, server_args.port)
    try:
        manager = TokenizerManager(server_args)
        await manager.start()
    except (ValueError, NotImplementedError, OSError) as exc:  # bad model, flags or devices
        sock.close()
        raise StartupError(f"{type(exc).__name__}: {exc}") from exc
    ctx = build_context(manager, server_args)
    config = uvicorn.Config(
        create_app(ctx, server_args),
        log_config=None,  # keep the process's logging setup (stdout)
        log_level=server_args.log_level.lower(),
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
    )
    server = uvicorn.Server(config)
    logger.info(
        "serving %s (%s) dtype=%s kv_capacity=%d tokens context_length=%d on %s",
        ctx.model.name, ctx.model.path, ctx.model.dtype, ctx.model.kv_capacity_tokens,
        ctx.model.context_length, _url(sock),
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        if not server.started:  # otherwise the app's lifespan has shut the manager down
            await manager.shutdown()
