"""Property-based fuzzing (hypothesis) of the public request paths on a real local cluster
(redis-server, a prefill and a decode worker on the generated tiny chat model, the router):

- gRPC `Router/Generate` with generated requests (wrong and huge numbers, NaN and infinite
  floats, weird unicode, empty and bogus fields, ids outside the vocabulary, long stop lists)
  and with random bytes as the message body, through a raw channel;
- HTTP `/v1/completions` and `/v1/chat/completions` with generated JSON (known fields with any
  JSON value, unknown fields, wrong types) and with random bytes as the body.

Every request ends in time with a status a caller's input may get (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, ALREADY_EXISTS; HTTP 200, 400, 404, 413, 429), never INTERNAL / UNKNOWN
/ 500, never a hang; no process dies; at the end every KV block is free.

The default run is bounded (`EXAMPLES` per property, derandomized: the same inputs every
run, under a minute with the cluster's start-up). A deeper, random run:

    TANDEM_FUZZ_EXAMPLES=2000 python -m pytest -q tests/e2e/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.local_cluster import LocalCluster
from engine.model_config import ModelConfig
from tandem_proto.tandem.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.e2e.helpers import blocks_all_free, wait_until

pytestmark = pytest.mark.timeout(600)

DEEP = "TANDEM_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not DEEP, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
CALL_TIMEOUT_S = 30.0  # a request still running after this is a hang
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
HTTP_OK = {200, 400, 404, 413, 429}


@pytest.fixture(scope="module")
def cluster(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("fuzz-cluster-logs")
    with LocalCluster(tiny_chat_llama, prefill=1, decode=1, log_dir=logs,
                      worker_args=["--num-blocks", "64"],
                      router_args=["--max-output-tokens", "16", "--max-prompt-tokens", "200",
                                   "--max-request-bytes", "65536"]) as running:
        yield running


@pytest.fixture(scope="module")
def channel(cluster: LocalCluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.router_address) as chan:
        yield chan


@pytest.fixture(scope="module")
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.http_url, timeout=CALL_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def vocab(tiny_chat_llama: Path) -> int:
    return ModelConfig.from_dir(tiny_chat_llama).vocab_size


# ---- strategies ------------------------------------------------------------------------------

# protobuf strings are UTF-8: lone surrogates cannot be sent at all, everything else can
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200)
U32 = st.integers(0, 2**32 - 1)
FLOAT = st.floats(width=32)  # NaN and infinities included
SMALL_IDS = st.lists(st.integers(0, 300), min_size=1, max_size=40)


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        stop=draw(st.lists(TEXT, max_size=20)),
        stop_token_ids=draw(st.lists(st.one_of(st.integers(0, 300), U32), max_size=4)),
        ignore_eos=draw(st.booleans()))
    for name, values in (("temperature", FLOAT), ("top_p", FLOAT), ("top_k", U32),
                         ("seed", st.integers(0, 2**64 - 1)),
                         ("max_tokens", st.one_of(st.integers(0, 20), U32))):
        value = draw(st.one_of(st.none(), values))
        if value is not None:
            setattr(pb, name, value)
    return pb


@st.composite
def generate_requests(draw: st.DrawFn) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(
        text=draw(st.one_of(st.just(""), TEXT)),
        token_ids=draw(st.one_of(st.just([]), SMALL_IDS, st.lists(U32, max_size=8))),
        sampling=draw(st.one_of(st.just(common_pb2.SamplingParams(max_tokens=4)), sampling())))
    for name in ("request_id", "cache_salt"):
        value = draw(st.one_of(st.none(), TEXT))
        if value is not None:
            setattr(request, name, value)
    return request


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "logprobs",
          "ignore_eos", "echo", "user", "cache_salt"]


@st.composite
def http_bodies(draw: st.DrawFn, model: str) -> dict[str, Any]:
    """A plausible request with some fields replaced by any JSON, some unknown ones added."""
    body: dict[str, Any] = {
        "model": draw(st.sampled_from([model, model, "", "gpt-4"])),
        "prompt": draw(st.one_of(st.text(max_size=100), SMALL_IDS, st.lists(st.text(
            max_size=20), max_size=3))),
        "messages": draw(st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]),
            "content": st.one_of(st.text(max_size=100), JSON)}), max_size=3)),
        "max_tokens": draw(st.integers(1, 16)),
        "stream": draw(st.booleans()),
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        body[name] = draw(JSON)
    for name in draw(st.lists(st.text(max_size=12), max_size=2)):
        body[name] = draw(JSON)
    return body


# ---- checks ----------------------------------------------------------------------------------

def grpc_outcome(call: Any) -> grpc.StatusCode:
    """The status a streaming call ended with, its every message read."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def check_grpc(code: grpc.StatusCode, what: object) -> None:
    assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"hung: {what!r}"
    assert code in GRPC_OK, f"{code.name} for {what!r}"


def check_http(reply: httpx.Response, what: object) -> None:
    assert reply.status_code in HTTP_OK, f"{reply.status_code} {reply.text[:300]} for {what!r}"
    if reply.status_code == 200 and reply.headers.get("content-type", "").startswith(
            "text/event-stream"):
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", reply.text[-300:]
        for event in events[:-1]:
            error = json.loads(event).get("error")
            assert error is None or error.get("type") != "internal_error", event
    elif reply.status_code != 200:
        assert "error" in reply.json(), reply.text[:300]  # an OpenAI error body


# ---- properties ------------------------------------------------------------------------------

def test_grpc_generate_answers_every_request_with_a_proper_status(
        channel: grpc.Channel) -> None:
    stub = router_pb2_grpc.RouterStub(channel)

    @FUZZ
    @given(generate_requests())
    def prop(request: router_pb2.GenerateRequest) -> None:
        check_grpc(grpc_outcome(stub.Generate(request, timeout=CALL_TIMEOUT_S)), request)

    prop()


def test_grpc_generate_answers_random_bytes_with_a_proper_status(
        channel: grpc.Channel) -> None:
    generate = channel.unary_stream("/tandem.v1.Router/Generate")  # bytes in, bytes out

    @FUZZ
    @given(st.binary(max_size=300))
    def prop(body: bytes) -> None:
        check_grpc(grpc_outcome(generate(body, timeout=CALL_TIMEOUT_S)), body)

    prop()


def test_http_answers_every_request_with_a_proper_status(http: httpx.Client,
                                                          cluster: LocalCluster) -> None:
    model = http.get("/v1/models").json()["data"][0]["id"]

    @FUZZ
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           st.one_of(http_bodies(model), JSON))
    def prop(path: str, body: Any) -> None:
        content = json.dumps(body)  # lone surrogates escaped: the server sees them
        check_http(http.post(path, content=content,
                             headers={"content-type": "application/json"}), body)

    prop()


def test_http_answers_random_bytes_with_a_proper_status(http: httpx.Client) -> None:
    @FUZZ
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           st.binary(max_size=300), st.sampled_from(["application/json", "text/plain", ""]))
    def prop(path: str, body: bytes, content_type: str) -> None:
        check_http(http.post(path, content=body, headers={"content-type": content_type}),
                   body)

    prop()


async def test_after_the_fuzzing_every_process_lives_and_no_block_leaks(
        cluster: LocalCluster) -> None:
    for process in [cluster.router, *cluster.workers("prefill"), *cluster.workers("decode")]:
        assert process.alive, f"{process.name} died: {process.log()[-2000:]}"

    async def free() -> bool:
        return await blocks_all_free(cluster)
    await wait_until(free, timeout_s=30, what="every KV block free after the fuzzing")
