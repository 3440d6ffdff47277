"""The response bodies and stream chunks of completions and chat, as OpenAI writes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from router.request import Usage


def usage_body(usage: Usage | None) -> dict[str, Any]:
    """`usage`, with the prompt tokens served from a prefix cache in `prompt_tokens_details`."""
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens if usage else 0}}


@dataclass(frozen=True)
class Shape:
    """One response's id, model and kind; builds its body or its chunks."""

    kind: Literal["completions", "chat"]
    id: str
    model: str
    include_usage: bool = False  # streaming: `usage` on every chunk (null but the last)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str, usage: Usage | None) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text}}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text}
            head = self._head("text_completion")
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**head, "choices": [choice], "usage": usage_body(usage)}

    def chunk(self, text: str, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        """One streamed chunk; a chat's first one carries the assistant role."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text}
            head = self._head("text_completion")
        choice.update(logprobs=None, finish_reason=finish_reason)
        out = {**head, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_body(usage)}
