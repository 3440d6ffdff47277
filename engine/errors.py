"""The engine's one error type for requests it can never serve (no other Tandem imports).

`InvalidInput` is a `ValueError` whose message starts with the field at fault
("prompt_token_ids: 3000 tokens leave no room ..."); the services map it to INVALID_ARGUMENT
naming that field. Any other exception out of the engine is a bug, never the caller's fault.
`DuplicateRequest` says a request id is already running here; `EngineDead` that the engine
thread failed and this process can serve nothing more.
"""

from __future__ import annotations


class InvalidInput(ValueError):
    """A request this engine can never serve; the message names the field first."""


class DuplicateRequest(InvalidInput):
    """The request id is already running on this engine."""


class EngineDead(RuntimeError):
    """The engine thread failed; no further requests can be served by this process."""
