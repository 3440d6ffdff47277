"""The FastAPI application: the completion and chat routes, `/v1/models`, `/health`, the error
bodies, bearer tokens (`openai_api.auth`), and the HTTP tracing (the trace of a request starts
at its HTTP server span, whose context the router's spans and its gRPC calls to the workers
inherit)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from engine.chat_template import ChatTemplate
from observability.http_tracing import instrument_app
from openai_api import chat, completions, errors
from openai_api.auth import BearerAuthMiddleware
from openai_api.body_limit import BodyLimitMiddleware
from openai_api.state import ApiState, api_state
from router.api_tokens import ApiTokens
from router.router import Router
from router.token_streams import TokenStreams


def build_app(router: Router, tokens: ApiTokens | None = None,
              streams: TokenStreams | None = None) -> FastAPI:
    """The API over `router`, for its configured model; with `tokens`, every path but
    `/health` needs one of them as a bearer token (`openai_api.auth`), and with `streams` a
    token runs a bounded number of generations at once. Bodies over `max_request_bytes` are
    413 (`openai_api.body_limit`)."""
    config = router.config
    app = FastAPI(title="Tandem", summary="OpenAI-compatible API of a Tandem cluster")
    app.state.api = ApiState(router=router, model_name=config.model_name,
                             chat_template=ChatTemplate.from_dir(config.model),
                             default_max_tokens=config.default_max_tokens)
    errors.install(app)
    app.include_router(completions.routes)
    app.include_router(chat.routes)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(api_state(request))]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
        api = api_state(request)
        api.check_model(model)
        return _model_card(api)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """200 while the server runs (it stops listening when the router shuts down)."""
        return {"status": "ok"}

    if tokens is not None:
        failures = router.metrics.auth_failures.labels("http")
        app.add_middleware(BearerAuthMiddleware, tokens=tokens, on_refused=failures.inc,
                           streams=streams)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)  # outermost
    instrument_app(app)
    return app


def _model_card(api: ApiState) -> dict[str, Any]:
    return {"id": api.model_name, "object": "model", "created": api.created,
            "owned_by": "tandem", "max_model_len": api.context}
