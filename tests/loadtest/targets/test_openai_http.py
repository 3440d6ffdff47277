"""The OpenAI target's request bodies (its stream parsing is in test_sse.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.request import Request
from loadtest.targets.openai_http import OpenAITarget
from loadtest.tokens import TokenSpace

REQUEST = Request(0, (100, 200, 300), 16)


def test_completions_send_token_ids() -> None:
    target = OpenAITarget("http://h:8000/", "m")
    assert target.url == "http://h:8000/v1/completions"
    assert target.body(REQUEST) == {
        "model": "m", "prompt": [100, 200, 300], "max_tokens": 16, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True}
    assert "ignore_eos" not in OpenAITarget("http://h", "m", ignore_eos=False).body(REQUEST)


def test_chat_sends_the_decoded_text(tiny_llama: Path) -> None:
    space = TokenSpace.from_tokenizer_dir(tiny_llama)
    target = OpenAITarget("http://h", "m", "chat", space)
    body = target.body(REQUEST)
    assert target.url == "http://h/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": space.decode(REQUEST.token_ids)}]
    assert "prompt" not in body


def test_chat_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        OpenAITarget("http://h", "m", "chat", TokenSpace(100))
    with pytest.raises(ValueError, match="endpoint"):
        OpenAITarget("http://h", "m", "embeddings")
