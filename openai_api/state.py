"""What the API's handlers share: the router, the served model's name, context and template."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from engine.chat_template import ChatTemplate
from openai_api.errors import ApiError
from router.router import Router


@dataclass
class ApiState:
    router: Router
    model_name: str  # what `model` must say, and what /v1/models lists
    chat_template: ChatTemplate | None  # None: the model has none, chat is refused
    default_max_tokens: int  # of a completion that gives none
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        """The model's context, in tokens (prompt and generated together)."""
        return self.router.validator.context

    @property
    def chat_default_max_tokens(self) -> int:
        """A chat without max_tokens: the rest of the context, cut to `max_output_tokens`."""
        cap = self.router.validator.limits.max_output_tokens
        return min(self.context - 1, cap) if cap is not None else self.context - 1

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is unset or the served model's name."""
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist: this server serves "
                           f"{self.model_name!r} (GET /v1/models)", type="not_found_error",
                           param="model", code="model_not_found")


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state
