"""The OpenAI API of a real local cluster (redis-server, a prefill and a decode worker, the
router; the tiny Llama with a chat template), through clients nobody here wrote: the official
openai SDK and curl. Greedy text equals the gRPC path's and transformers'; bad input is a 400
naming the field and leaks nothing; a client that goes away frees the workers' blocks; the
router's metrics count an HTTP request as they count a gRPC one."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from engine.chat_template import ChatTemplate
from engine.tokenizer import Tokenizer
from tests.e2e.helpers import blocks_all_free, scrape, wait_until
from tests.engine.hf_reference import hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "llama-chat"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("openai-cluster-logs")
    with LocalCluster(tiny_chat_llama, prefill=1, decode=1, log_dir=logs,
                      worker_args=["--num-blocks", "192"]) as running:
        yield running


@pytest.fixture
async def sdk(cluster: LocalCluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="none",
                                  max_retries=0, timeout=120) as client:
        yield client


def chat_ids(model: Path) -> list[int]:
    """The chat's prompt ids as the API builds them: the template, no tokenizer specials."""
    text = ChatTemplate.from_dir(model)
    assert text is not None
    return Tokenizer.from_dir(model).encode(text.render([dict(m) for m in MESSAGES]),
                                            add_special_tokens=False)


async def test_greedy_text_equals_the_grpc_path_and_transformers(
        cluster: LocalCluster, sdk: openai.AsyncOpenAI, tiny_chat_llama: Path) -> None:
    import transformers

    tokenizer = Tokenizer.from_dir(tiny_chat_llama)
    ids = chat_ids(tiny_chat_llama)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_llama)
    assert hf_tokenizer.apply_chat_template([dict(m) for m in MESSAGES],  # type: ignore[arg-type]
                                            add_generation_prompt=True,
                                            tokenize=True, return_dict=False) == ids
    prompt = "Once upon a time"
    prompt_ids = tokenizer.encode(prompt)
    async with RouterClient(cluster.router_address) as grpc_client:
        grpc_chat = await grpc_client.complete(token_ids=ids, max_tokens=12, ignore_eos=True)
        grpc_text = await grpc_client.complete(text=prompt, max_tokens=12, ignore_eos=True)
    assert grpc_chat.text == tokenizer.decode(hf_greedy(tiny_chat_llama, ids, 12))
    assert grpc_text.text == tokenizer.decode(hf_greedy(tiny_chat_llama, prompt_ids, 12))

    chat = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert chat.choices[0].message.content == grpc_chat.text
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        grpc_chat.text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same chat, in the prefix cache

    completion = await sdk.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert completion.choices[0].text == grpc_text.text
    by_ids = await sdk.completions.create(model=MODEL, prompt=prompt_ids, stream=True,
                                          **GREEDY)
    assert "".join([c.choices[0].text async for c in by_ids]) == grpc_text.text


async def test_curl_streams_server_sent_events(cluster: LocalCluster,
                                               sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 12,
            "ignore_eos": True, "stream": True}
    done = await asyncio.to_thread(
        subprocess.run, ["curl", "-N", "-sS", "--fail-with-body", "--max-time", "120",
                         f"{cluster.http_url}/v1/chat/completions",
                         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines() if line]
    assert all(line.startswith("data: ") for line in done.stdout.splitlines() if line)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        whole.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_the_default_temperature_is_openais_one(sdk: openai.AsyncOpenAI) -> None:
    async def text(**sampling: Any) -> str:
        reply = await sdk.completions.create(model=MODEL, prompt="Once upon a time",
                                             max_tokens=8, extra_body={"ignore_eos": True},
                                             **sampling)
        return reply.choices[0].text

    greedy = await text(temperature=0)
    defaults = [await text(seed=seed) for seed in range(4)]
    assert defaults == [await text(seed=seed, temperature=1.0) for seed in range(4)]
    assert any(t != greedy for t in defaults)


async def test_bad_input_is_400_naming_the_field_and_leaks_nothing(
        cluster: LocalCluster, sdk: openai.AsyncOpenAI, tiny_chat_llama: Path) -> None:
    context = 2048  # the tiny model's
    too_long_text = "lorem ipsum dolor " * 2000
    assert len(Tokenizer.from_dir(tiny_chat_llama).encode(too_long_text)) > context
    user = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, Any, str]] = [
        ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', "body"),
        ("chat/completions", {"messages": user, "max_tokens": "many"}, "max_tokens"),
        ("chat/completions", {"messages": "hi"}, "messages"),
        ("completions", {"prompt": "hi", "temperature": [1]}, "temperature"),
        ("chat/completions", {"messages": user, "max_tokens": 10**9}, "max_tokens"),
        ("chat/completions", {"messages": user, "max_completion_tokens": context},
         "max_completion_tokens"),
        ("completions", {"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
        ("chat/completions", {"messages": []}, "messages"),
        ("chat/completions", {"messages": [{"role": "narrator", "content": "hi"}]},
         "messages[0].role"),
        ("completions", {"prompt": list(range(5, 5 + context))}, "prompt"),
        ("completions", {"prompt": too_long_text}, "prompt"),
        ("chat/completions", {"messages": [{"role": "user", "content": too_long_text}]},
         "messages"),
        ("chat/completions", {"messages": user, "n": 2}, "n"),
        ("chat/completions", {"messages": user, "logprobs": True}, "logprobs"),
    ]
    async with httpx.AsyncClient(timeout=60) as http:
        for path, body, param in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            reply = await http.post(f"{cluster.http_url}/v1/{path}", content=content,
                                    headers={"Content-Type": "application/json"})
            error = reply.json()["error"]
            assert reply.status_code == 400, (path, body if isinstance(body, bytes) else param,
                                              error)
            assert error["param"] == param and error["message"].startswith(f"{param}: "), error
            assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="messages: List should have at least 1") \
            as caught:
        await sdk.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.param == "messages"
    await wait_until(lambda: blocks_all_free(cluster), what="every block free")
    good = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert good.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_goes_away_frees_the_workers_blocks(
        cluster: LocalCluster, stream: bool) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True,
            "stream": stream}
    generating = asyncio.Event()

    async def call() -> None:
        async with httpx.AsyncClient(timeout=300) as http, http.stream(
                "POST", f"{cluster.http_url}/v1/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if '"content":"' in line.replace(" ", "") and "content\":\"\"" not in line:
                    generating.set()

    async def busy() -> bool:
        if generating.is_set():
            return True
        return not await blocks_all_free(cluster)

    task = asyncio.create_task(call())
    await wait_until(busy, timeout_s=60, what="the request to hold blocks")
    await asyncio.sleep(0.2)
    assert not task.done() and not await blocks_all_free(cluster)  # mid-request
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: blocks_all_free(cluster), timeout_s=30, what="every block free")
    async with RouterClient(cluster.router_address) as client:
        status = await client.status()
    assert status.counters["inflight"] == 0


async def test_router_metrics_count_an_http_request_as_a_grpc_one(
        cluster: LocalCluster, sdk: openai.AsyncOpenAI) -> None:
    counted = ("_total", "_count")

    def counters() -> dict[str, float]:
        return {k: v for k, v in scrape(cluster.router).items() if k.endswith(counted)}

    async def once_counted(previous: dict[str, float]) -> dict[str, float]:
        """The counters once the request just answered has ended in them: the router records
        a request's end (all its counters at once) just after sending its last message, so a
        scrape right after the client's last message can come first."""
        latest: dict[str, float] = {}

        async def ended() -> bool:
            nonlocal latest
            latest = counters()
            return latest.get("tandem_requests_total", 0) > previous.get("tandem_requests_total", 0)

        await wait_until(ended, timeout_s=10, what="the request's end in the router's metrics")
        return latest

    before = counters()
    await sdk.completions.create(model=MODEL, prompt=list(range(100, 140)), max_tokens=6,
                                 temperature=0, extra_body={"ignore_eos": True})
    middle = await once_counted(before)
    async with RouterClient(cluster.router_address) as client:
        await client.complete(token_ids=list(range(200, 240)), max_tokens=6, ignore_eos=True)
    after = await once_counted(middle)
    http_delta = {k: middle[k] - before.get(k, 0) for k in middle}
    grpc_delta = {k: after[k] - middle.get(k, 0) for k in after}
    assert http_delta == grpc_delta
    assert http_delta["tandem_requests_received_total"] == 1, http_delta
    assert http_delta["tandem_requests_total"] == 1
    assert http_delta["tandem_prompt_tokens_total"] == 40
    assert http_delta["tandem_generation_tokens_total"] == 6
    assert http_delta["tandem_time_to_first_token_seconds_count"] == 1
