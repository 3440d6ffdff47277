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

from cluster.errors import LimitExceeded
from openai_api.errors import error_body
from router.api_tokens import ApiTokens
from router.token_streams import TokenStreams

OPEN_PATHS = frozenset({"/health"})


class BearerAuthMiddleware:
    """Refuses HTTP requests without a valid bearer token (see the module doc); with
    `streams`, a POST holds one of its token's stream slots until its response is sent (429
    when none is free)."""

    def __init__(self, app: ASGIApp, tokens: ApiTokens, on_refused: Callable[[], None],
                 streams: TokenStreams | None = None) -> None:
        self.app = app
        self.tokens = tokens
        self.on_refused = on_refused
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        authorization = header.decode("latin-1") if header is not None else None
        if self.tokens.accepts(authorization):
            if self.streams is None or scope["method"] != "POST":
                await self.app(scope, receive, send)
                return
            try:
                slot = self.streams.acquire(authorization)
            except LimitExceeded as error:
                await JSONResponse(error_body(str(error), "rate_limit_error", None,
                                              "too_many_streams"), status_code=429)(
                    scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.streams.release(slot)
            return
        self.on_refused()
        message = ("missing bearer token (header 'Authorization: Bearer <token>')"
                   if header is None else "invalid bearer token")
        response = JSONResponse(error_body(message, "authentication_error", None,
                                           "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
