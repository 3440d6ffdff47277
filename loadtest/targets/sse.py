"""Server-sent events as OpenAI-compatible servers stream them, parsed by pure functions.

`SSEDecoder` turns bytes, cut anywhere, into event data (the WHATWG rules a completion stream
uses: `data:` lines joined by newlines, dispatched on a blank line; comments and other fields
ignored; any line ending). It is written here rather than taken from `httpx-sse` because it is
these few lines, and the tests feed it literal byte streams without a client. `parse_chunk`
reads one event's JSON: a `/v1/completions` or `/v1/chat/completions` chunk, the usage chunk,
`[DONE]`, or an error object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from loadtest.targets.base import TargetError

_LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = "[DONE]"


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the `data` of each completed event."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while (match := _LINE_END.search(self._buffer)) is not None:
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # maybe the first half of a \r\n cut in two
            line = self._buffer[:match.start()].decode("utf-8")
            self._buffer = self._buffer[match.end():]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[str]:
        """The end of the stream: an event not yet ended by a blank line is dispatched."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None


@dataclass(frozen=True)
class ChunkDelta:
    """What one completion chunk says: new text, a finish reason, the usage when present."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    done: bool = False  # the `[DONE]` sentinel


def parse_chunk(data: str) -> ChunkDelta:
    """One event's data from a completions or chat completions stream; raises `TargetError`
    for an error object sent in the stream."""
    if data.strip() == DONE:
        return ChunkDelta(done=True)
    try:
        raw: dict[str, Any] = json.loads(data)
    except json.JSONDecodeError as e:
        raise TargetError("BAD_STREAM", f"not JSON: {data[:200]!r}: {e}") from None
    if "error" in raw:
        error = raw["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise TargetError(str(code or "STREAM_ERROR"), message)
    text, finish = "", None
    for choice in raw.get("choices") or ():
        if "delta" in choice:  # chat
            text += choice["delta"].get("content") or ""
        else:
            text += choice.get("text") or ""
        finish = choice.get("finish_reason") or finish
    usage = raw.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return ChunkDelta(text, finish, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                      details.get("cached_tokens"))
