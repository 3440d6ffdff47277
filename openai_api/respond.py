"""Runs one generation through the router and answers it: a JSON body, or server-sent events.

The first delta is awaited before anything is sent, so every error before the first token
(validation, admission, no worker, routing, prefill) is an HTTP status with an error body.
After that the response is a 200 stream; an error mid-stream is sent as one more event,
`data: {"error": {...}}` (the body an error response would have had; the openai SDK raises it
as an `APIError`), and the stream ends, as every stream does, with `data: [DONE]`. A decode
worker that releases the request (it is shutting down) is such an error (503), never a finish
reason OpenAI clients would not know.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.errors import NoWorker
from observability.tracing import annotate, set_request_id
from openai_api.disconnect import unless_disconnected
from openai_api.errors import describe
from openai_api.responses import Shape
from router.request import Delta, GenerateInput
from router.router import Router
from router.text_log import OutputText, RequestTextLog

log = logging.getLogger(__name__)

RELEASED = "the decode worker released the request before it finished (it is shutting down)"


def _event(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _checked(delta: Delta) -> Delta:
    if delta.finish_reason == "cancelled":
        raise NoWorker(RELEASED)
    return delta


async def _collect(first: Delta, deltas: AsyncIterator[Delta]) -> tuple[str, Delta]:
    text, last = [first.text], _checked(first)
    while last.finish_reason is None:
        last = _checked(await anext(deltas))
        text.append(last.text)
    return "".join(text), last


async def respond(request: Request, router: Router, generate: GenerateInput, shape: Shape,
                  stream: bool, aliases: Mapping[str, str]) -> Response:
    """The response to one request (see the module doc)."""
    annotate({"tandem.request_id": generate.request_id})
    text_log = RequestTextLog(router.config.log_request_text)
    output = text_log.output(generate.request_id)
    with set_request_id(generate.request_id):
        text_log.prompt(generate)
        deltas = router.generate(generate)
        try:
            first = await unless_disconnected(request, anext(deltas))
            if not stream:
                text, last = await unless_disconnected(request, _collect(first, deltas))
                assert last.finish_reason is not None
                output.add(text)
                output.done()
                return JSONResponse(shape.body(text, last.finish_reason, last.usage))
        except BaseException:
            await deltas.aclose()
            raise
    return StreamingResponse(_sse(first, deltas, shape, aliases, generate.request_id, output),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(first: Delta, deltas: AsyncGenerator[Delta, None], shape: Shape,
               aliases: Mapping[str, str], request_id: str,
               output: OutputText) -> AsyncIterator[bytes]:
    with set_request_id(request_id):
        try:
            if shape.kind == "chat":
                yield _event(shape.chunk("", first=True))
            delta = first
            while True:
                _checked(delta)
                output.add(delta.text)
                if delta.text or delta.finish_reason is not None:
                    yield _event(shape.chunk(delta.text, delta.finish_reason))
                if delta.finish_reason is not None:
                    output.done()
                    break
                delta = await anext(deltas)
            if shape.include_usage:
                yield _event(shape.usage_chunk(delta.usage))
        except Exception as error:  # after the first token: an error event (module doc)
            status, body = describe(error, aliases)
            if status >= 500 and status != 503:
                log.error("stream failed", exc_info=error)
            else:
                log.info("stream ended with %d: %s", status, body["error"]["message"])
            yield _event(body)
        finally:
            await deltas.aclose()  # nothing left to do once finished; a client gone: cancels
        yield _event("[DONE]")
