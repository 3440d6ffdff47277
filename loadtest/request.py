"""What the harness sends: one prompt as token ids, with its output length and its tags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One request of a workload.

    `token_ids` is the prompt, exact: the gRPC target and `/v1/completions` send the ids as they
    are; `/v1/chat/completions` sends their decoded text. `max_tokens` is the output length, made
    exact by ignoring the end-of-sequence token. `group` names the sharing structure the request
    belongs to ("g3" for a shared-prefix group, "c2" for a conversation, "" for none) and `turn`
    its place in a conversation. `arrival_s` is the trace's own send time, when it has one.
    """

    index: int
    token_ids: tuple[int, ...]
    max_tokens: int
    group: str = ""
    turn: int = 0
    arrival_s: float | None = None

    @property
    def input_len(self) -> int:
        return len(self.token_ids)
