"""The public API's bearer tokens: read from `api_tokens_file`, checked in constant time.

    tokens = ApiTokens.load(config.api_tokens_file)     # None: no file, no authentication
    tokens.accepts("Bearer s3cret")                     # an Authorization value, or None

The file holds one token a line; blank lines and lines starting with `#` are skipped, so a
Kubernetes Secret's key can be mounted as it is. Both fronts ask the same object: the gRPC
interceptor (`public_interceptor`, metadata `authorization`) and the HTTP middleware
(`openai_api.auth`, header `Authorization`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.grpc_auth import MetadataAuthInterceptor

_SCHEME = "bearer "


@dataclass(frozen=True)
class ApiTokens:
    """The tokens any one of which opens the public API."""

    tokens: tuple[bytes, ...]

    @classmethod
    def load(cls, path: str) -> ApiTokens:
        """The tokens of `path`; ValueError naming `api_tokens_file` when it cannot be read or
        holds none."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"api_tokens_file: cannot read {path}: {error}") from error
        tokens = tuple(line.strip().encode() for line in lines
                       if line.strip() and not line.lstrip().startswith("#"))
        if not tokens:
            raise ValueError(f"api_tokens_file: {path} holds no token (one a line)")
        return cls(tokens)

    def accepts(self, authorization: str | None) -> bool:
        """Whether `authorization` ("Bearer <token>", the scheme case-insensitive) carries one
        of the tokens. Every token is compared, each in constant time, so the time taken does
        not tell which token, or how much of one, matched."""
        if authorization is None or authorization[:len(_SCHEME)].lower() != _SCHEME:
            return False
        given = authorization[len(_SCHEME):].strip().encode()
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(given, token)
        return matched


def public_interceptor(tokens: ApiTokens, on_refused: Callable[[str], None],
                       ) -> MetadataAuthInterceptor:
    """For the router's server: `tandem.v1.Router` calls need metadata `authorization:
    Bearer <token>` (health and reflection stay open)."""
    return MetadataAuthInterceptor(
        ["tandem.v1.Router"], "authorization", tokens.accepts, on_refused=on_refused,
        hint="tandem.v1.Router: a missing or wrong bearer token (metadata 'authorization: "
             "Bearer <token>')")
