"""Errors as the OpenAI API writes them: `{"error": {"message", "type", "param", "code"}}`.

One table maps what can go wrong to an HTTP status. The router's domain errors are mapped
through the same table the gRPC edge uses (`cluster.grpc_errors.status_for`: exception →
status code), then from that code to HTTP here, so a new domain error needs one line, not two:

| gRPC status (domain error)                     | HTTP | type                   |
| ---------------------------------------------- | ---- | ---------------------- |
| INVALID_ARGUMENT (InvalidRequest, InvalidInput)| 400  | invalid_request_error  |
| NOT_FOUND (an unknown model, `ApiError`)       | 404  | not_found_error        |
| ALREADY_EXISTS (AlreadyRunning)                | 409  | conflict_error         |
| RESOURCE_EXHAUSTED (NoCapacity: load shed)     | 429  | rate_limit_error       |
| UNAVAILABLE (NoWorker, ...)                    | 503  | service_unavailable    |
| DEADLINE_EXCEEDED (a queue wait ran out)       | 504  | timeout_error          |
| anything else                                  | 500  | internal_error (logged)|

Request validation (pydantic) errors are 400s whose `param` is the field's path
(`messages[0].role`). `param` names the HTTP API's field: the router's own names for the
prompt ("text", "token_ids") are renamed by the endpoint (`PARAM_ALIASES`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.convert import as_invalid
from cluster.errors import InvalidRequest, TandemError
from cluster.grpc_errors import status_for
from engine.errors import DuplicateRequest, EngineDead, InvalidInput
from openai_api.disconnect import ClientDisconnected
from openai_api.schemas import NEUTRAL

# gRPC status → (HTTP status, OpenAI error type)
HTTP_OF: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
INTERNAL = (500, "internal_error")

# The router's names for a request's parts → the API's, per endpoint (set on request.state).
PARAM_ALIASES: dict[str, dict[str, str]] = {
    "completions": {"text": "prompt", "token_ids": "prompt", "sampling.stop": "stop",
                    "sampling.max_tokens": "max_tokens"},
    "chat": {"text": "messages", "token_ids": "messages", "prompt": "messages",
             "sampling.stop": "stop", "sampling.max_tokens": "max_tokens"},
}


@dataclass
class ApiError(Exception):
    """An error the API itself decides (an unknown model, a model without a chat template)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException, aliases: Mapping[str, str] | None = None,
             ) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for `exc` (see the module doc)."""
    if isinstance(exc, ClientDisconnected):  # nobody reads it; for the access log
        return 499, error_body(str(exc), "client_closed_request")
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, InvalidInput) and not isinstance(exc, DuplicateRequest):
        exc = as_invalid(exc)  # the engine's "field: message"
    if isinstance(exc, InvalidRequest):
        param = (aliases or {}).get(exc.field, exc.field)
        return 400, error_body(f"{param}: {exc.message}", "invalid_request_error", param)
    code, details = status_for(exc)
    status, type_ = HTTP_OF.get(code, INTERNAL)
    return status, error_body(details, type_, None, code.name.lower())


def validation_param(loc: Sequence[str | int]) -> str:
    """`("body", "messages", 0, "role")` → `messages[0].role`."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(error: Mapping[str, Any]) -> tuple[str, str]:
    """(param, readable message) of one pydantic error."""
    param = validation_param(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "body", f"body: malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    if kind == "extra_forbidden":
        name = param.rsplit(".", 1)[-1]
        if name in NEUTRAL:
            accepted = ", ".join(json.dumps(v) for v in NEUTRAL[name] if v is not None)
            return param, (f"{param}: not supported by Tandem (accepted: "
                           f"{accepted + ', or ' if accepted else ''}leaving it unset)")
        return param, f"{param}: unknown field"
    if kind == "missing":
        return param, f"{param}: required"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if message.startswith(f"{param}: ") or (param == "body" and ": " in message):
        field = message.split(": ", 1)[0]
        return (field if param == "body" else param), message
    return param, f"{param}: {message}"


def _first_error(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    # A value that fits no member of a union yields one error per member; the most specific
    # (deepest) says most.
    best = max(errors, key=lambda e: len(e.get("loc", ())))
    if any(e.get("type") in ("json_invalid", "extra_forbidden", "missing") for e in errors):
        best = next(e for e in errors
                    if e.get("type") in ("json_invalid", "extra_forbidden", "missing"))
    return validation_message(best)


def install(app: FastAPI) -> None:
    """Every error the app raises becomes an OpenAI error body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _first_error(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8 JSON, an unknown path, a wrong
        # method) in the same OpenAI error body as ours
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        param = "body" if exc.status_code == 400 else None
        message = f"body: {exc.detail}" if param else str(exc.detail)
        return JSONResponse(error_body(message, type_, param), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        status, body = describe(exc, getattr(request.state, "param_aliases", None))
        return JSONResponse(body, status_code=status)

    # The expected errors, answered here.
    for cls in (ApiError, ClientDisconnected, TandemError, InvalidInput, EngineDead, TimeoutError):
        app.add_exception_handler(cls, _mapped)
    # A bug: the same body with 500; Starlette re-raises it after answering, so the server logs
    # it with its traceback.
    app.add_exception_handler(Exception, _mapped)
