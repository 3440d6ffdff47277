"""Bearer tokens on the HTTP API: every path but `/health` needs `Authorization: Bearer
<token>` (`router.api_tokens`); otherwise a 401 with an OpenAI error body (type
`authentication_error`, what the openai SDK raises as `AuthenticationError`) and a
`WWW-Authenticate: Bearer` header, counted by the caller's `on_refused`.

A pure ASGI middleware rather than a route dependency: it answers before routing, so an unknown
path is a 401 too (nothing is learnt about the API without a token), and it does not wrap
streamed bodies.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from openai_api.errors import error_body
from router.api_tokens import ApiTokens

OPEN_PATHS = frozenset({"/health"})


class BearerAuthMiddleware:
    """Refuses HTTP requests without a valid bearer token (see the module doc)."""

    def __init__(self, app: ASGIApp, tokens: ApiTokens, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.tokens = tokens
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.tokens.accepts(header.decode("latin-1") if header is not None else None):
            await self.app(scope, receive, send)
            return
        self.on_refused()
        message = ("missing bearer token (header 'Authorization: Bearer <token>')"
                   if header is None else "invalid bearer token")
        response = JSONResponse(error_body(message, "authentication_error", None,
                                           "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
