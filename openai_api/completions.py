"""`POST /v1/completions`: a prompt (text or token ids) continued by the model."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from openai_api.errors import PARAM_ALIASES
from openai_api.respond import respond
from openai_api.responses import Shape
from openai_api.sampling import sampling_params
from openai_api.schemas import CompletionRequest
from openai_api.state import api_state
from router.request import GenerateInput

routes = APIRouter()


@routes.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    api = api_state(request)
    aliases = request.state.param_aliases = PARAM_ALIASES["completions"]
    api.check_model(body.model)
    sampling = sampling_params(body, body.max_tokens, "max_tokens", api.default_max_tokens,
                               api.context)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompt = body.prompt
    generate = GenerateInput(
        request_id=request_id, text=prompt if isinstance(prompt, str) else "",
        token_ids=[] if isinstance(prompt, str) else list(prompt),  # type: ignore[arg-type]
        sampling=sampling, stop=body.stops)
    shape = Shape("completions", request_id, api.model_name, include_usage=body.include_usage)
    return await respond(request, api.router, generate, shape, body.stream, aliases)
