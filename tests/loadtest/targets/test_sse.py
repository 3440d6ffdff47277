"""SSE decoding and completion-chunk parsing on literal streams, as vLLM and OpenAI send them.

The end-to-end HTTP test (a real server: vLLM's, or Tandem's own OpenAI front) is left to the
integration of the HTTP front; here the parsing is pure and fed bytes.
"""

from __future__ import annotations

import pytest

from loadtest.targets.base import TargetError
from loadtest.targets.sse import ChunkDelta, SSEDecoder, parse_chunk

# vLLM's /v1/completions with stream_options.include_usage (ids and times shortened)
VLLM_COMPLETIONS = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":" Hello","logprobs":null,"finish_reason":null,'
    b'"stop_reason":null}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":" world","logprobs":null,"finish_reason":null,'
    b'"stop_reason":null}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":"!","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null}],"usage":null}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3,'
    b'"prompt_tokens_details":{"cached_tokens":8}}}\n\n'
    b"data: [DONE]\n\n")

# OpenAI's /v1/chat/completions: a role chunk, content, the finish, the usage chunk, [DONE]
OPENAI_CHAT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\r\n\r\n'
    b': keep-alive\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt",'
    b'"choices":[{"index":0,"delta":{"content":" th\xc3\xa9re"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n")


def decode_all(stream: bytes, cut: int | None = None) -> list[str]:
    decoder = SSEDecoder()
    if cut is None:
        events = decoder.feed(stream)
    else:
        events = [e for i in range(0, len(stream), cut) for e in decoder.feed(stream[i:i + cut])]
    return events + decoder.close()


def test_vllm_completions_stream() -> None:
    deltas = [parse_chunk(e) for e in decode_all(VLLM_COMPLETIONS)]
    assert [d.text for d in deltas] == [" Hello", " world", "!", "", ""]
    assert deltas[2].finish_reason == "length"
    assert deltas[3] == ChunkDelta(prompt_tokens=12, completion_tokens=3, cached_tokens=8)
    assert deltas[4].done


def test_openai_chat_stream() -> None:
    deltas = [parse_chunk(e) for e in decode_all(OPENAI_CHAT)]
    assert [d.text for d in deltas] == ["", "Hi", " thére", "", "", ""]  # the comment is gone
    assert deltas[3].finish_reason == "stop"
    assert (deltas[4].prompt_tokens, deltas[4].completion_tokens, deltas[4].cached_tokens) == (
        9, 2, 0)
    assert deltas[5].done


@pytest.mark.parametrize("stream", [VLLM_COMPLETIONS, OPENAI_CHAT])
@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64])
def test_any_cut_of_the_bytes_gives_the_same_events(stream: bytes, cut: int) -> None:
    assert decode_all(stream, cut) == decode_all(stream)


def test_sse_field_rules() -> None:
    stream = (b"event: message\nid: 3\ndata: first line\ndata:second\nretry: 10\n\n"
              b"data: a\r\rdata: b\n\n\n\n:comment only\n\n")
    assert decode_all(stream) == ["first line\nsecond", "a", "b"]
    assert decode_all(b"data: no blank line at the end") == ["no blank line at the end"]


def test_an_error_object_in_the_stream_raises() -> None:
    with pytest.raises(TargetError) as error:
        parse_chunk('{"error": {"message": "context too long", "code": 400}}')
    assert (error.value.code, error.value.message) == ("400", "context too long")
    with pytest.raises(TargetError, match="BAD_STREAM"):
        parse_chunk("{not json")
