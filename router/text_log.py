"""Prompt and output text in logs and spans: only when `log_request_text` is on.

By default no log line or span attribute of the router carries a prompt (text or token ids)
or generated text: a request is logged by its id, counts and statuses. Turned on (debugging a
deployment whose traffic may be seen), each request logs its prompt and, once it ends, its
output, at INFO under its request id, and sets `tandem.prompt` / `tandem.output` on the span
current when they are logged. Both fronts call it (`router.service`, `openai_api.respond`).
"""

from __future__ import annotations

import logging

from observability.tracing import annotate
from router.request import GenerateInput

log = logging.getLogger(__name__)


class OutputText:
    """Gathers a request's generated text when logging is on; nothing otherwise."""

    def __init__(self, request_id: str, enabled: bool) -> None:
        self.request_id = request_id
        self.enabled = enabled
        self._parts: list[str] = []

    def add(self, text: str) -> None:
        if self.enabled:
            self._parts.append(text)

    def done(self) -> None:
        if self.enabled:
            text = "".join(self._parts)
            log.info("request %s output: %r", self.request_id, text)
            annotate({"tandem.output": text})


class RequestTextLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def prompt(self, request: GenerateInput) -> None:
        if not self.enabled:
            return
        prompt = request.text if request.text else repr(request.token_ids)
        log.info("request %s prompt: %r", request.request_id, prompt)
        annotate({"tandem.prompt": prompt})

    def output(self, request_id: str) -> OutputText:
        return OutputText(request_id, self.enabled)
