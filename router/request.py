"""What the router takes in and streams back, free of protobuf (the servicers convert)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateInput:
    """One generation request, as the client sent it (validated by `router.validate`)."""

    request_id: str
    text: str
    token_ids: list[int]
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    cache_salt: str = ""
    # Whether tokenizing `text` applies the tokenizer's template (e.g. a bos token). False for
    # a rendered chat: the chat template already wrote every special token the model expects.
    add_special_tokens: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """One message of the stream: new tokens and text; the last one has `finish_reason`."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    usage: Usage | None = None
    stop_string: str = ""  # the stop string that ended the stream, on the last message
