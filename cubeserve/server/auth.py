"""``--api-key``: every endpoint except the liveness probe needs ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from cubeserve.server.errors import error_response

PUBLIC_PATHS = frozenset({"/health"})


def bearer_token(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        token = bearer_token(authorization)
        # compare_digest: the time taken does not reveal how much of the key matched.
        return token is not None and hmac.compare_digest(token, self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
