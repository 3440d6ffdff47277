"""The API against a real router with scripted workers (see conftest.py): the openai SDK's
view of every endpoint, of each error status, of errors mid-stream, and what a client that goes
away cancels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from engine.tokenizer import Tokenizer
from openai_api.app import build_app
from openai_api.server import HttpServer
from tests.openai_api.conftest import Factory
from tests.router.fakes import FIRST_TOKEN, Script

pytestmark = pytest.mark.timeout(60)

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def scripted_text(model: Path, tokens: int) -> str:
    return Tokenizer.from_dir(model).decode([FIRST_TOKEN] + [100] * tokens)


async def test_chat_and_completions_streamed_and_not(make_api: Factory,
                                                     tiny_chat_llama: Path) -> None:
    async with make_api() as api:
        expected = scripted_text(tiny_chat_llama, 3)
        chat = await api.client.chat.completions.create(model="llama-chat", messages=CHAT,
                                                        max_tokens=8)
        assert chat.object == "chat.completion" and chat.model == "llama-chat"
        assert chat.choices[0].message.content == expected
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 4
        assert chat.usage.prompt_tokens_details is not None
        assert chat.usage.prompt_tokens_details.cached_tokens == 0
        completion = await api.client.completions.create(model="llama-chat", prompt="Hi",
                                                         max_tokens=8)
        assert completion.choices[0].text == expected
        prompt_tokens = len(Tokenizer.from_dir(tiny_chat_llama).encode("Hi"))  # bos included
        assert completion.usage is not None and completion.usage.prompt_tokens == prompt_tokens

        stream = await api.client.chat.completions.create(
            model="llama-chat", messages=CHAT, max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
        assert all(c.usage is None for c in chunks[:-1])

        text_stream = await api.client.completions.create(model="llama-chat", prompt=[5, 6, 7],
                                                          max_tokens=8, stream=True)
        pieces = [chunk async for chunk in text_stream]
        assert "".join(c.choices[0].text for c in pieces) == expected
        assert all(c.usage is None for c in pieces)

        models = await api.client.models.list()
        assert [m.id for m in models.data] == ["llama-chat"]
        assert (await api.client.models.retrieve("llama-chat")).id == "llama-chat"
        async with httpx.AsyncClient() as http:
            health = await http.get(api.base_url.removesuffix("/v1") + "/health")
        assert health.status_code == 200


async def test_unknown_model_and_a_model_without_chat_template(make_api: Factory,
                                                               tiny_llama: Path) -> None:
    async with make_api() as api:
        with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist") as caught:
            await api.client.chat.completions.create(model="gpt-4", messages=CHAT)
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        with pytest.raises(openai.NotFoundError):
            await api.client.models.retrieve("gpt-4")
    async with make_api(model=tiny_llama, served_model_name="base") as api:
        with pytest.raises(openai.BadRequestError, match="no chat template") as bad:
            await api.client.chat.completions.create(model="base", messages=CHAT)
        assert bad.value.param == "messages"
        done = await api.client.completions.create(model="base", prompt="Hi", max_tokens=2)
        assert done.choices[0].finish_reason == "length"


async def test_no_worker_is_503_before_the_stream_starts(make_api: Factory) -> None:
    async with make_api(prefill=0, decode=0) as api:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError, match="no live") as caught:
                await api.client.chat.completions.create(model="llama-chat", messages=CHAT,
                                                         stream=stream)
            assert caught.value.status_code == 503
            assert caught.value.body["type"] == "service_unavailable"  # type: ignore[index]


async def test_load_shed_by_admission_is_429(make_api: Factory) -> None:
    async with make_api(max_inflight=1, max_queue=1) as api:
        api.decode[0].script = Script(tokens=1, hold=True)
        running = await api.client.chat.completions.create(
            model="llama-chat", messages=CHAT, max_tokens=50, stream=True)
        first = await anext(aiter(running))
        assert first.choices[0].delta.role == "assistant"
        queued = asyncio.create_task(api.client.chat.completions.create(
            model="llama-chat", messages=CHAT, max_tokens=50))
        while api.router.admission.waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue full") as caught:
            await api.client.completions.create(model="llama-chat", prompt="x")
        assert caught.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        await running.close()  # the held request is cancelled; the queued one runs, then held
        while not api.decode[0].holding() or api.router.admission.waiting:
            await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        while api.router.admission.inflight:
            await asyncio.sleep(0.01)
        assert len(api.decode[0].cancelled) == 2


async def test_an_error_mid_stream_is_an_error_event_then_done(make_api: Factory) -> None:
    async with make_api() as api:
        api.decode[0].script = Script(tokens=2, fail_with=grpc.StatusCode.INTERNAL)
        stream = await api.client.chat.completions.create(model="llama-chat", messages=CHAT,
                                                          max_tokens=8, stream=True)
        with pytest.raises(openai.APIError, match="failed mid-request: INTERNAL"):
            async for _chunk in stream:
                pass
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(f"{api.base_url}/completions", json={
                "prompt": "x", "max_tokens": 8, "stream": True})
        assert reply.status_code == 200
        events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and "INTERNAL" in error["message"]


async def test_a_released_request_is_503_not_a_finish_reason(make_api: Factory) -> None:
    async with make_api() as api:
        (decode,) = api.decode
        decode.script = Script(tokens=1, hold=True)
        call = asyncio.create_task(api.client.completions.create(
            model="llama-chat", prompt="x", max_tokens=8))
        while not decode.holding():
            await asyncio.sleep(0.01)
        decode.on_cancel("anything")  # the worker lets go of every held stream
        for event in decode._held.values():
            event.set()
        with pytest.raises(openai.InternalServerError, match="released the request"):
            await call


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_goes_away_cancels_the_request(make_api: Factory,
                                                           stream: bool) -> None:
    async with make_api() as api:
        (decode,) = api.decode
        decode.script = Script(tokens=1, hold=True)
        body = {"messages": CHAT, "max_tokens": 50, "stream": stream}

        async def call() -> None:
            async with httpx.AsyncClient(timeout=30) as http, \
                    http.stream("POST", f"{api.base_url}/chat/completions", json=body) as reply:
                async for _line in reply.aiter_lines():
                    pass

        task = asyncio.create_task(call())
        while not decode.holding():
            await asyncio.sleep(0.01)
        task.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if decode.cancelled and not api.router.admission.inflight:
                break
            await asyncio.sleep(0.01)
        assert len(decode.cancelled) == 1 and decode.holding() == 0
        assert api.router.admission.inflight == 0
        assert api.router.stats.outcomes["cancelled"] == 1


async def test_a_busy_port_is_an_error_naming_http_listen(make_api: Factory) -> None:
    async with make_api() as api:
        address = api.base_url.removeprefix("http://").removesuffix("/v1")
        with pytest.raises(OSError, match="http_listen: cannot listen on"):
            await HttpServer(object(), address, grace_s=1).start()


async def test_stopping_the_server_ends_streams_in_flight_after_the_grace(
        make_api: Factory) -> None:
    async with make_api() as api:
        (decode,) = api.decode
        decode.script = Script(tokens=1, hold=True)
        http = HttpServer(build_app(api.router),
                          "127.0.0.1:0", grace_s=0.5)
        address = await http.start()

        async def call() -> list[str]:
            async with httpx.AsyncClient(timeout=30) as client, client.stream(
                    "POST", f"http://{address}/v1/completions",
                    json={"prompt": "x", "max_tokens": 50, "stream": True}) as reply:
                return [line async for line in reply.aiter_lines() if line]

        streaming = asyncio.create_task(call())
        while not decode.holding():
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await http.stop()
        assert loop.time() - started < 5
        with pytest.raises(httpx.RemoteProtocolError):  # cut off, not finished
            await streaming
        for _ in range(200):
            if decode.cancelled:
                break
            await asyncio.sleep(0.01)
        assert len(decode.cancelled) == 1
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://{address}/health")
