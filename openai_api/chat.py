"""`POST /v1/chat/completions`: messages rendered with the model's chat template, answered.

The template comes from the model folder (`engine.chat_template`, rendered as transformers
renders it) and already writes every special token, so the rendered text is tokenized without
the tokenizer's own (a bos token would be doubled). A `developer` message is a `system` one
(OpenAI's newer name for it); content parts are taken when they are text, joined by newlines.
A model without a template cannot chat: 400, naming `messages`.
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request, Response

from cluster.errors import InvalidRequest
from engine.chat_template import ChatTemplateError
from openai_api.errors import PARAM_ALIASES, ApiError
from openai_api.respond import respond
from openai_api.responses import Shape
from openai_api.sampling import sampling_params
from openai_api.schemas import ChatCompletionRequest
from openai_api.state import api_state
from router.request import GenerateInput

routes = APIRouter()


@routes.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    api = api_state(request)
    aliases = request.state.param_aliases = PARAM_ALIASES["chat"]
    api.check_model(body.model)
    if api.chat_template is None:
        raise ApiError(400, f"messages: model {api.model_name!r} has no chat template (no "
                       "chat_template.jinja, no chat_template in tokenizer_config.json): use "
                       "/v1/completions", param="messages", code="no_chat_template")
    max_tokens: int | None = body.max_tokens
    param = "max_tokens"
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    # Unset: up to the end of the context (the engine stops there), as OpenAI answers.
    sampling = sampling_params(body, max_tokens, param, api.chat_default_max_tokens,
                               api.context)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in body.messages]
    try:
        text = await asyncio.to_thread(api.chat_template.render, messages)
    except ChatTemplateError as error:
        raise InvalidRequest("messages", str(error)) from None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generate = GenerateInput(request_id=request_id, text=text, token_ids=[], sampling=sampling,
                             stop=body.stops, add_special_tokens=False)
    shape = Shape("chat", request_id, api.model_name, include_usage=body.include_usage)
    return await respond(request, api.router, generate, shape, body.stream, aliases)
