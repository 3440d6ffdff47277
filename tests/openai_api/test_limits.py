"""The router's request limits on both fronts, each refusal naming its limit: the request size
(413 / RESOURCE_EXHAUSTED), prompt tokens, max_tokens and the stop list (400 /
INVALID_ARGUMENT), concurrent generations per API token (429 / RESOURCE_EXHAUSTED); and no
prompt or output text in a log line or a span unless `log_request_text` is on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc import aio
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cli.router_client import RouterClient
from observability import tracing
from tandem_proto.tandem.v1 import router_pb2, router_pb2_grpc
from tests.openai_api.conftest import Factory

pytestmark = pytest.mark.timeout(60)

MODEL = "llama-chat"
LIMITS = {"max_prompt_tokens": 40, "max_output_tokens": 32, "max_stop_strings": 2,
          "max_stop_chars": 5}


async def test_a_body_or_message_over_max_request_bytes_is_refused_naming_it(
        make_api: Factory) -> None:
    async with make_api(max_request_bytes=4096) as api:
        body = {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 2}
        async with httpx.AsyncClient(timeout=10) as http:
            declared = await http.post(f"{api.base_url}/completions", json=body)

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
                for _ in range(5):
                    yield b" " * 1000
            chunked = await http.post(f"{api.base_url}/completions", content=chunks())
            small = await http.post(f"{api.base_url}/completions",
                                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        for reply in (declared, chunked):
            assert reply.status_code == 413, reply.text
            error = reply.json()["error"]
            assert "the limit is 4096 bytes (max_request_bytes)" in error["message"]
            assert error["code"] == "request_too_large"
        assert small.status_code == 200
        async with aio.insecure_channel(api.grpc_address) as channel:
            with pytest.raises(aio.AioRpcError) as refused:
                await router_pb2_grpc.RouterStub(channel).Generate(
                    router_pb2.GenerateRequest(text="x" * 5000), timeout=10).read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max (5003 vs. 4096)" in (refused.value.details() or "")  # grpc core


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"prompt": list(range(1, 42))}, "prompt", "41 tokens; the limit is 40 (max_prompt_tokens)"),
    ({"max_tokens": 33}, "max_tokens", "33; the limit is 32 (max_output_tokens)"),
    ({"stop": ["a", "b", "c"]}, "stop", "3 stop strings; the limit is 2 (max_stop_strings)"),
    ({"stop": ["abcdef"]}, "stop", "6 characters; the limit is 5 (max_stop_chars)"),
])
async def test_prompt_max_tokens_and_stops_over_their_limits_are_refused_naming_them(
        make_api: Factory, fields: dict[str, Any], param: str, says: str) -> None:
    async with make_api(**LIMITS) as api:
        request = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, **fields}
        with pytest.raises(openai.BadRequestError) as refused:
            await api.client.completions.create(**request)
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == param and says in error["message"]
        async with RouterClient(api.grpc_address) as client:
            with pytest.raises(aio.AioRpcError) as grpc_refused:
                stop = request.get("stop", ())
                async for _ in client.generate(token_ids=request["prompt"],
                                               max_tokens=request["max_tokens"], stop=stop):
                    pass
        assert grpc_refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert says in (grpc_refused.value.details() or "")
        # a chat with no max_tokens asks for the rest of the context: cut to the limit
        chat = await api.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].finish_reason is not None


async def test_an_api_token_runs_at_most_max_streams_per_token_generations(
        make_api: Factory) -> None:
    async with make_api(api_tokens=["alice", "bob"], max_streams_per_token=1) as api:
        api.decode[0].script.hold = True  # each stream stays open until cancelled
        first = await api.client.completions.create(model=MODEL, prompt="hi", max_tokens=64,
                                                    stream=True)
        await anext(aiter(first))
        with pytest.raises(openai.RateLimitError) as refused:  # alice's second, over HTTP
            await api.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert "the limit is 1 (max_streams_per_token)" in str(refused.value)
        async with RouterClient(api.grpc_address, "alice") as client:  # and over gRPC
            with pytest.raises(aio.AioRpcError) as grpc_refused:
                async for _ in client.generate(text="hi", max_tokens=2):
                    pass
        assert grpc_refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_token" in (grpc_refused.value.details() or "")
        api.decode[0].script.hold = False
        async with RouterClient(api.grpc_address, "bob") as client:  # bob has his own
            assert [c async for c in client.generate(text="hi", max_tokens=2)]
        await first.close()  # alice's slot comes back once her stream has ended

        async def freed() -> bool:
            try:
                await api.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            except openai.RateLimitError:
                return False
            return True
        for _ in range(50):
            if await freed():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("alice's slot never came back")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "router"}),
                              shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.use_tracer_provider(provider):
        yield memory
    provider.shutdown()


@pytest.mark.parametrize("enabled", [False, True])
async def test_prompt_and_output_text_reach_logs_and_spans_only_when_enabled(
        make_api: Factory, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture,
        enabled: bool) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "zebra-quartz-marker"
    async with make_api(log_request_text=enabled) as api:
        api.decode[0].script.tokens = 8
        reply = await api.client.completions.create(model=MODEL, prompt=f"say {marker}",
                                                    max_tokens=9)
        http_output = reply.choices[0].text
        stream = await api.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"chat {marker}"}],
            max_tokens=9, stream=True)
        async for _ in stream:
            pass
        async with RouterClient(api.grpc_address) as client:
            grpc_output = "".join([c.text async for c in client.generate(
                text=f"grpc {marker}", max_tokens=9)])
    assert len(http_output) >= 6 and grpc_output == http_output
    logged = "\n".join(record.getMessage() for record in caplog.records)
    spans = "\n".join(str(value) for span in exporter.get_finished_spans()
                      for value in (span.attributes or {}).values())
    assert exporter.get_finished_spans()  # spans were recorded
    for where in (logged, spans):
        for text in (f"say {marker}", f"chat {marker}", f"grpc {marker}", http_output):
            assert (text in where) is enabled, (text, enabled)


async def test_a_body_that_is_not_utf8_json_gets_an_openai_error_body(make_api: Factory) -> None:
    """FastAPI's own refusal (found by tests/e2e/test_fuzz.py) in the API's error shape."""
    async with make_api() as api, httpx.AsyncClient(timeout=10) as http:
        reply = await http.post(f"{api.base_url}/completions", content=b"\x80",
                                headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "body"
    assert reply.json()["error"]["type"] == "invalid_request_error"
