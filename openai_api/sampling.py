"""A request body's sampling fields as the engine's `SamplingParams`, with the API's defaults.

Defaults are OpenAI's, not Tandem's gRPC ones, because OpenAI clients are written against
them: `temperature` 1.0 (the gRPC API's is 0, greedy; send `temperature: 0` for greedy),
`top_p` 1.0. An unset `max_tokens` is the router's `default_max_tokens` for completions (16,
OpenAI's own for completions) and the rest of the context for chat (OpenAI's: the answer ends
when the model ends it). A `max_tokens` the context can never hold (at least the whole context)
is refused, naming the field; a smaller one that the prompt leaves no room for ends the answer
at the context's end with finish reason "length", as the gRPC API does.
"""

from __future__ import annotations

from cluster.convert import as_invalid
from cluster.errors import InvalidRequest
from engine.sampling import SamplingParams
from openai_api.schemas import GenerationFields

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (Tandem's gRPC default is 0.0, greedy)
DEFAULT_TOP_P = 1.0


def sampling_params(body: GenerationFields, max_tokens: int | None, max_tokens_param: str,
                    default_max_tokens: int, context: int) -> SamplingParams:
    """Validated sampling parameters; `InvalidRequest` naming the field when unusable."""
    if max_tokens is not None and max_tokens >= context:
        raise InvalidRequest(max_tokens_param,
                             f"{max_tokens} tokens cannot fit the model's context of {context} "
                             f"tokens, prompt included (at most {context - 1})")
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=(body.temperature if body.temperature is not None
                         else DEFAULT_TEMPERATURE),
            top_p=body.top_p if body.top_p is not None else DEFAULT_TOP_P,
            top_k=body.top_k or 0, seed=body.seed, ignore_eos=body.ignore_eos)
    except ValueError as error:  # SamplingParams' own checks, "field: message"
        raise as_invalid(error) from None
