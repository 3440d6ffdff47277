"""Request validation and the 400 bodies it gives: each refusal names the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from cluster.errors import DeadlineExceeded, InvalidRequest, NoCapacity, NoWorker
from engine.errors import InvalidInput
from openai_api.errors import PARAM_ALIASES, ApiError, _first_error, describe
from openai_api.sampling import DEFAULT_TEMPERATURE, sampling_params
from openai_api.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def refusal(model: type[Any], body: dict[str, Any]) -> tuple[str, str]:
    """(param, message) of the 400 a body gets."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return _first_error(list(RequestValidationError(caught.value.errors()).errors()))


def test_what_the_openai_sdk_and_load_clients_send_is_taken() -> None:
    chat = ChatCompletionRequest.model_validate({
        **CHAT, "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "max_completion_tokens": 8, "temperature": 1, "top_p": 0.5, "seed": 3, "stop": "x",
        "n": 1, "user": "u", "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0})
    assert chat.include_usage and chat.stops == ["x"] and chat.temperature == 1.0
    completion = CompletionRequest.model_validate({"prompt": ["one prompt"], "max_tokens": 4,
                                                   "top_k": 5, "ignore_eos": True})
    assert completion.prompt == "one prompt" and not completion.stream
    assert CompletionRequest.model_validate({"prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    parts = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].text == "a\nb"


@pytest.mark.parametrize(("body", "param", "says"), [
    ({**CHAT, "n": 2}, "n", "not supported"),
    ({**CHAT, "logprobs": True}, "logprobs", "not supported"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({**CHAT, "frobnicate": 1}, "frobnicate", "unknown field"),
    ({**CHAT, "max_tokens": "8"}, "max_tokens", "integer"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "temperature": "hot"}, "temperature", "number"),
    ({**CHAT, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
    ({**CHAT, "stream": "yes"}, "stream", "boolean"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({**CHAT, "stop": ["", "x"]}, "stop", "must not be empty"),
    ({**CHAT, "seed": -1}, "seed", "greater than or equal to 0"),
    ({"messages": []}, "messages", "at least 1"),
    ({}, "messages", "required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'user'"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", "'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", ""),
])
def test_a_bad_chat_is_refused_naming_the_field(body: dict[str, Any], param: str,
                                                says: str) -> None:
    got_param, message = refusal(ChatCompletionRequest, body)
    assert got_param.startswith(param), (got_param, message)
    assert message.startswith(f"{got_param}: ") and says in message, message


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": [1, -2]}, "prompt", ">= 0"),
    ({"prompt": 5}, "prompt", ""),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "max_completion_tokens": 3}, "max_completion_tokens", "unknown field"),
])
def test_a_bad_completion_is_refused_naming_the_field(body: dict[str, Any], param: str,
                                                      says: str) -> None:
    got_param, message = refusal(CompletionRequest, body)
    assert got_param.startswith(param) and says in message, (got_param, message)


def test_defaults_are_openais_temperature_one_and_a_huge_max_tokens_is_refused() -> None:
    body = CompletionRequest.model_validate({"prompt": "x"})
    sampling = sampling_params(body, None, "max_tokens", 16, 2048)
    assert DEFAULT_TEMPERATURE == 1.0 and sampling.temperature == 1.0
    assert sampling.top_p == 1.0 and sampling.top_k == 0 and sampling.max_tokens == 16
    greedy = CompletionRequest.model_validate({"prompt": "x", "temperature": 0})
    assert sampling_params(greedy, 2047, "max_tokens", 16, 2048).greedy
    with pytest.raises(InvalidRequest) as caught:
        sampling_params(body, 2048, "max_completion_tokens", 16, 2048)
    assert caught.value.field == "max_completion_tokens"


@pytest.mark.parametrize(("error", "status", "type_"), [
    (InvalidRequest("token_ids", "too long"), 400, "invalid_request_error"),
    (InvalidInput("max_tokens: too many blocks"), 400, "invalid_request_error"),
    (ApiError(404, "no such model", type="not_found_error"), 404, "not_found_error"),
    (NoCapacity("queue full"), 429, "rate_limit_error"),
    (NoWorker("no live decode worker"), 503, "service_unavailable"),
    (DeadlineExceeded("queue wait"), 504, "timeout_error"),
    (RuntimeError("a bug"), 500, "internal_error"),
])
def test_one_table_maps_errors_to_statuses(error: Exception, status: int, type_: str) -> None:
    got, body = describe(error, PARAM_ALIASES["completions"])
    assert got == status and body["error"]["type"] == type_
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 400:
        assert body["error"]["param"] in ("prompt", "max_tokens")
        assert body["error"]["message"].startswith(body["error"]["param"] + ": ")
