"""Incremental detokenization with stop strings, for the token stream the router relays.

Text that could be the start of a stop string is held back until the next tokens show it is
not; when a stop string appears, the text before it is released and the request stops.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""  # decoded, not yet released
        self.matched = ""  # the stop string that ended the stream, once one did

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """(text to release now, whether a stop string was reached)."""
        self.pending += self.decoder.extend(token_ids)
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                text, self.pending, self.matched = self.pending[:at], "", stop
                return text, True
        if self.hold == 0 or not self.stops:
            text, self.pending = self.pending, ""
            return text, False
        cut = max(len(self.pending) - self.hold, 0)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def flush(self) -> str:
        """The held-back text, at the end of the stream."""
        text = self.pending + self.decoder.finish()
        self.pending = ""
        return text
