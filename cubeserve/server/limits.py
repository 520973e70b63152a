"""Overload protection: a request body size limit and a bound on requests in flight."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cubeserve.server.errors import APIError, ClientDisconnected, error_response

RETRY_AFTER_S = 1


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: early from Content-Length, else while it is read.

    The body is read here, in full, and replayed to the app: FastAPI would turn an error
    raised from inside its own body parsing into a generic 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        try:
            body = None if declared.isdigit() and int(declared) > self.max_bytes else await self._read_body(receive)
        except ClientDisconnected:
            return
        if body is None:
            message = f"request body exceeds the limit of {self.max_bytes} bytes (--max-request-bytes)"
            await error_response(413, message)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only the disconnect is left to wait for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to be too large."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnected
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


class AdmissionControl:
    """Bounds the sequences being served (running in the engine or queued for it).

    The engine would queue without limit; refusing at the door with 503 + Retry-After keeps
    latency bounded for admitted requests and lets load balancers retry elsewhere.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def acquire(self, sequences: int) -> None:
        if sequences > self.capacity:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts x n), more than the "
                                f"{self.capacity} this server serves at once", param="n")
        if self.in_flight + sequences > self.capacity:
            raise APIError(
                503, f"server is at capacity ({self.capacity} sequences in flight); retry later",
                code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_flight += sequences

    def release(self, sequences: int) -> None:
        self.in_flight -= sequences
