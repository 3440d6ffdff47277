"""The limit fields of `RouterConfig` are validated naming the field; `TokenStreams` counts
generations per token and gives slots back."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.errors import LimitExceeded
from router.config import RouterConfig
from router.token_streams import TokenStreams


def config(**fields: Any) -> RouterConfig:
    return RouterConfig(model="/m", redis_url="redis://r", **fields)


def test_the_defaults_bound_every_request() -> None:
    defaults = config()
    assert defaults.max_request_bytes == 8 * 1024 * 1024
    assert (defaults.max_stop_strings, defaults.max_stop_chars,
            defaults.max_streams_per_token) == (16, 256, 128)
    assert defaults.max_prompt_tokens is None and defaults.max_output_tokens is None
    assert defaults.log_request_text is False


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_request_bytes": 100}, "max_request_bytes: must be >= 1024"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens: must be >= 1 or unset"),
    ({"max_output_tokens": -1}, "max_output_tokens: must be >= 1 or unset"),
    ({"max_stop_strings": 0}, "max_stop_strings: must be >= 1"),
    ({"max_stop_chars": 0}, "max_stop_chars: must be >= 1"),
    ({"max_streams_per_token": 0}, "max_streams_per_token: must be >= 1"),
    ({"max_output_tokens": 8, "default_max_tokens": 16},
     "default_max_tokens: 16 exceeds max_output_tokens 8"),
])
def test_a_bad_limit_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**fields)


def test_token_streams_count_per_token_and_give_slots_back() -> None:
    streams = TokenStreams(limit=2)
    with streams.stream("Bearer a"), streams.stream("Bearer a"):
        assert streams.running("Bearer a") == 2
        with pytest.raises(LimitExceeded, match=r"runs 2 .* the limit is 2 "
                                                r"\(max_streams_per_token\)"), \
                streams.stream("Bearer a"):
            pass
        with streams.stream("Bearer b"):  # another token is not held back
            assert streams.running("Bearer b") == 1
    assert streams.running("Bearer a") == 0 and streams.refused == 1
    with pytest.raises(RuntimeError), streams.stream("Bearer a"):
        raise RuntimeError("a failed generation still gives its slot back")
    assert streams.running("Bearer a") == 0
