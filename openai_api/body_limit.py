"""The HTTP body-size limit: a body over `max_request_bytes` is a 413 naming the limit,
before FastAPI reads or parses it.

A pure ASGI middleware: a declared `Content-Length` over the limit is refused at once; a body
without one (chunked) is read up to the limit and refused as soon as it passes it, then handed
on as it came. The same limit bounds a gRPC message (the router's max receive length).
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_api.errors import error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(scope, receive, send, 400, "body: Content-Length is not a "
                                   "number", "invalid_request_error")
                return
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, size)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []  # chunked: read it, counting, then replay it
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, total)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        await self._refuse(scope, receive, send, 413,
                           f"body: {size} bytes; the limit is {self.max_bytes} bytes "
                           f"(max_request_bytes)", "invalid_request_error")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      type_: str) -> None:
        response = JSONResponse(error_body(message, type_, "body", "request_too_large"
                                           if status == 413 else None), status_code=status)
        await response(scope, receive, send)
