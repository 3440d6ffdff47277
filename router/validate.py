"""A generation request checked and turned into prompt token ids, without blocking the router.

Every refusal is an `InvalidRequest` naming the field (and, for a configured limit, the limit:
`RequestLimits`, from `RouterConfig`). Text is tokenized on a worker thread
(the tokenizer releases the GIL), and a text too large to fit the model's context is refused
before tokenizing it: each token stands for at most `Tokenizer.max_token_bytes` bytes of text,
so a text of more than `context × max_token_bytes` bytes cannot fit, whatever it says. Request
ids are restricted to a safe alphabet, so no id can forge a log line or a metric label.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from cluster.errors import InvalidRequest
from engine.model_config import ModelConfig
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.request import GenerateInput

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_request_id(request_id: str) -> None:
    """Raises InvalidRequest unless the id is 1-128 letters, digits and `._:-`."""
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest("request_id", f"must be 1 to 128 characters among letters, digits "
                             f"and '._:-', got {request_id[:40]!r}"
                             + ("..." if len(request_id) > 40 else ""))


@dataclass(frozen=True)
class RequestLimits:
    """The router's per-request limits (`RouterConfig`'s fields of the same names; None: the
    model's context is the only bound)."""

    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_stop_strings: int = 16
    max_stop_chars: int = 256


class PromptValidator:
    """Checks requests against one model's tokenizer and context, and the configured limits."""

    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig,
                 limits: RequestLimits | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits or RequestLimits()
        self.vocab_size = model_config.vocab_size
        self.context = model_config.max_position_embeddings
        self.max_text_bytes = min(self.context, (self.limits.max_prompt_tokens or self.context)
                                  + 1) * tokenizer.max_token_bytes

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt: the limit, and room for one generated token in the context."""
        return min(self.context - 1, self.limits.max_prompt_tokens or self.context)

    def check_limits(self, request: GenerateInput) -> None:
        """The stop list and max_tokens against the limits (InvalidRequest naming both)."""
        limits = self.limits
        if len(request.stop) > limits.max_stop_strings:
            raise InvalidRequest("sampling.stop", f"{len(request.stop)} stop strings; the limit "
                                 f"is {limits.max_stop_strings} (max_stop_strings)")
        longest = max((len(s) for s in request.stop), default=0)
        if longest > limits.max_stop_chars:
            raise InvalidRequest("sampling.stop", f"a stop string of {longest} characters; the "
                                 f"limit is {limits.max_stop_chars} (max_stop_chars)")
        cap = limits.max_output_tokens
        if cap is not None and request.sampling.max_tokens > cap:
            raise InvalidRequest("sampling.max_tokens", f"{request.sampling.max_tokens}; the "
                                 f"limit is {cap} (max_output_tokens)")

    async def prompt_ids(self, request: GenerateInput) -> list[int]:
        """The prompt's token ids; InvalidRequest naming the field when it is unusable."""
        check_request_id(request.request_id)
        self.check_limits(request)
        if request.text and request.token_ids:
            raise InvalidRequest("prompt", "set exactly one of text and token_ids, not both")
        if any(not s for s in request.stop):
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        bad_stops = [t for t in request.sampling.stop_token_ids if t >= self.vocab_size]
        if bad_stops:
            raise InvalidRequest("sampling.stop_token_ids",
                                 f"{bad_stops} outside the vocabulary [0, {self.vocab_size})")
        if request.text:
            ids = await self._tokenize(request.text, request.add_special_tokens)
        else:
            ids = list(request.token_ids)
        field_name = "text" if request.text else "token_ids"
        if not ids:
            raise InvalidRequest("prompt", "empty: set text or token_ids")
        bad = [t for t in ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequest("token_ids",
                                 f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.context:
            raise InvalidRequest(field_name, f"the prompt has {len(ids)} tokens; the model's "
                                 f"context is {self.context} and at least one token must be "
                                 "generated")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(field_name, f"the prompt has {len(ids)} tokens; the limit is "
                                 f"{self.max_prompt_tokens} (max_prompt_tokens)")
        return ids

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        size = len(text.encode())
        if size > self.max_text_bytes:
            bound = (f"the model's context of {self.context} tokens"
                     if self.limits.max_prompt_tokens is None else
                     f"max_prompt_tokens {self.max_prompt_tokens}")
            raise InvalidRequest("text", f"{size} bytes cannot fit {bound} (at most "
                                 f"{self.max_text_bytes} bytes of text)")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)


def request_limits(config: RouterConfig) -> RequestLimits:
    return RequestLimits(config.max_prompt_tokens, config.max_output_tokens,
                         config.max_stop_strings, config.max_stop_chars)
