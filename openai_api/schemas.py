"""The request bodies of the OpenAI-compatible API, validated by pydantic (FastAPI runs it).

Strict types (a string is not a number, a number is not a boolean) and no unknown field: a
field Tandem does not implement is refused with a 400 naming it (`openai_api.errors` maps the
validation errors). Clients that send an unimplemented field at its no-op value (`"logprobs":
false`, `"presence_penalty": 0`, `"n": 1`) are served: `NEUTRAL` lists the values taken as
"not asked for" and dropped before validation.

Taken: `model`, `prompt` (a string, token ids, or a list of one of those) or `messages`,
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n` = 1,
`stream`, `stream_options.include_usage`, `user` (accepted, unused); extensions `top_k` and
`ignore_eos`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fields Tandem does not implement, and the values that ask for nothing (accepted, dropped).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}

MAX_SEED = 2**63  # the engine's seeds are 63-bit


def _drop_neutral(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: v for k, v in data.items()
                if not (k in NEUTRAL and any(v == n and type(v) is type(n) for n in NEUTRAL[k]))}
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with `usage` and no choices


class GenerationFields(BaseModel):
    """What completions and chat share: sampling, stops, streaming."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # unset: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # unset: 1.0, as OpenAI
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension; 0 or unset: no top-k cut
    seed: int | None = Field(default=None, ge=0, lt=MAX_SEED)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # extension: generate max_tokens whatever the model says
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        return _drop_neutral(data)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        """A list of one prompt is that prompt; a batch of several is refused."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list)
                                                       for p in prompt):
            if len(prompt) > 1:
                raise ValueError(f"{len(prompt)} prompts: send one prompt per request")
            return prompt[0]
        return prompt

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if not prompt:
            raise ValueError("must not be empty")
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise ValueError("token ids must be >= 0")
        return prompt


class TextPart(BaseModel):
    """A content part of a message; only text parts are taken."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # wins over max_tokens
