"""The public API's token file and check, and the router's secret settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.api_tokens import ApiTokens
from router.config import RouterConfig


def test_tokens_are_read_one_a_line_skipping_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# ops\n  alpha \n\nbeta\n#gamma\n")
    tokens = ApiTokens.load(str(path))
    assert tokens.tokens == (b"alpha", b"beta")
    assert tokens.accepts("Bearer alpha") and tokens.accepts("bearer beta")
    for refused in (None, "", "alpha", "Bearer", "Bearer ", "Bearer gamma", "Bearer alph",
                    "Bearer alphaa", "Basic alpha", "Bearer # ops"):
        assert not tokens.accepts(refused), refused


def test_an_unreadable_or_empty_token_file_is_an_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="api_tokens_file: cannot read"):
        ApiTokens.load(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="api_tokens_file: .* holds no token"):
        ApiTokens.load(str(tmp_path / "empty"))


def test_the_router_needs_the_cluster_secret_off_loopback() -> None:
    with pytest.raises(ValueError, match="transfer_token: required .* TANDEM_TRANSFER_TOKEN"):
        RouterConfig(model="/m", redis_url="redis://r", listen="0.0.0.0:50051")
    RouterConfig(model="/m", redis_url="redis://r", listen="0.0.0.0:50051", transfer_token="s")
    RouterConfig(model="/m", redis_url="redis://r", listen="127.0.0.1:0")  # the dev secret
    with pytest.raises(ValueError, match="transfer_token: must not be empty"):
        RouterConfig(model="/m", redis_url="redis://r", transfer_token="")
    with pytest.raises(ValueError, match="api_tokens_file: must not be empty"):
        RouterConfig(model="/m", redis_url="redis://r", api_tokens_file="")
