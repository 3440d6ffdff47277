"""An instant OpenAI-compatible backend: every completion is the same few tokens, sent at once.

    python loadtest/scripts/instant_backend.py --port 9001 [--tokens 1]

For measuring HTTP routers (vllm-router, sglang-router) against each other and against a direct
connection: the backend costs as little as a Starlette app on uvicorn can, so what a router adds
is the difference between its latency and the direct one. It answers `/v1/completions` and
`/v1/chat/completions` (streamed as SSE when `stream` is true, with a usage chunk), `/v1/models`,
and the health and info paths the routers poll (`/health`, `/health_generate`,
`/get_server_info`, `/get_model_info`, `/v1/models`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "instant"


def chunk(kind: str, text: str | None, finish: str | None, usage: dict | None = None) -> bytes:
    """One SSE `data:` event of a completion (`kind` "text_completion") or a chat chunk."""
    if kind == "text_completion":
        choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish}]
    else:
        choices = [] if text is None else [
            {"index": 0, "delta": {"content": text}, "finish_reason": finish}]
    body = {"id": "cmpl-instant", "object": kind, "created": int(time.time()), "model": MODEL,
            "choices": choices, "usage": usage}
    return f"data: {json.dumps(body)}\n\n".encode()


def make_app(tokens: int) -> Starlette:
    """The app; each completion is `tokens` tokens of " x"."""

    async def complete(request: Request) -> Response:
        body = await request.json()
        kind = "text_completion" if request.url.path.endswith("/completions") and \
            "chat" not in request.url.path else "chat.completion.chunk"
        prompt = body.get("prompt") or []
        prompt_tokens = len(prompt) if isinstance(prompt, list) else 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                 "total_tokens": prompt_tokens + tokens}
        if not body.get("stream"):
            text = " x" * tokens
            choice = {"index": 0, "text": text, "finish_reason": "length"} \
                if kind == "text_completion" else \
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "length"}
            return JSONResponse({"id": "cmpl-instant", "object": kind.removesuffix(".chunk"),
                                 "model": MODEL, "choices": [choice], "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            for i in range(tokens):
                yield chunk(kind, " x", "length" if i == tokens - 1 else None)
            yield chunk(kind, None, None, usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL, "object": "model", "owned_by": "loadtest"}]})

    async def ok(_: Request) -> Response:
        return JSONResponse({"model_path": MODEL, "status": "ok"})

    return Starlette(routes=[
        Route("/v1/completions", complete, methods=["POST"]),
        Route("/v1/chat/completions", complete, methods=["POST"]),
        Route("/v1/models", models),
        *[Route(path, ok) for path in ("/health", "/health_generate", "/get_server_info",
                                       "/get_model_info")]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=1, help="tokens per completion")
    args = parser.parse_args()
    uvicorn.run(make_app(args.tokens), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
