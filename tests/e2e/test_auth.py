"""The attacks of issue 13's security section that tokens and the cluster secret stop, on a
real local cluster whose router has bearer tokens and whose processes share a real cluster
secret (not the development one):

- the public API (gRPC and HTTP, the openai SDK) without a token or with a wrong one:
  UNAUTHENTICATED / 401 `authentication_error`, counted; with the right one it serves;
- a local process forging the router's internal calls (Decode/Reserve to hog blocks,
  Worker/Cancel to end another user's request, Prefill) without the cluster secret, or with the
  development secret: UNAUTHENTICATED, and nothing changes (free blocks, the victim's stream);
- health stays open everywhere.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cli.local_cluster import LocalCluster, ServiceProcess
from cli.router_client import Chunk, RouterClient
from cluster.cluster_secret import LOCAL_DEV_TOKEN
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    worker_pb2_grpc,
)
from tests.e2e.helpers import cluster_auth, wait_until, worker_status

pytestmark = pytest.mark.timeout(300)

SECRET = "e2e-cluster-secret"
TOKENS = ("alice-token", "bob-token")


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    """1 prefill + 1 decode worker and a router with two API tokens, one real secret."""
    logs = tmp_path_factory.mktemp("auth-cluster-logs")
    tokens_file = logs / "api-tokens"
    tokens_file.write_text(f"# the API's tokens\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=logs,
                      worker_args=["--num-blocks", "64", "--transfer-token", SECRET],
                      router_args=["--transfer-token", SECRET,
                                   "--api-tokens-file", str(tokens_file)],
                      api_token=TOKENS[1]) as running:
        yield running


def auth_failures(process: ServiceProcess) -> dict[str, float]:
    """tandem_router_auth_failures_total by its `api` label."""
    with urllib.request.urlopen(f"http://{process.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.labels["api"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "tandem_router_auth_failures_total"}


async def complete(address: str, token: str | None, max_tokens: int = 4) -> list[Chunk]:
    async with RouterClient(address, token) as client:
        return [c async for c in client.generate(token_ids=[5, 6, 7, 8], max_tokens=max_tokens)]


async def test_grpc_api_refuses_a_missing_or_wrong_token_and_counts_it(
        cluster: LocalCluster) -> None:
    before = auth_failures(cluster.router)
    for token in (None, "mallory-token", f"{TOKENS[0]}x", TOKENS[0][:-1]):
        with pytest.raises(aio.AioRpcError) as refused:
            await complete(cluster.router_address, token)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (refused.value.details() or "")
    async with RouterClient(cluster.router_address, "wrong") as client:
        with pytest.raises(aio.AioRpcError) as refused:
            await client.status()  # GetClusterStatus lists the workers' addresses
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    after = auth_failures(cluster.router)
    assert after["grpc"] - before["grpc"] == 5 and after["http"] == before["http"]
    for token in TOKENS:  # either token of the file
        chunks = await complete(cluster.router_address, token)
        assert sum(len(c.token_ids) for c in chunks) == 4
        assert chunks[-1].finish_reason == "length"
    async with aio.insecure_channel(cluster.router_address) as channel:  # health stays open
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_http_api_refuses_a_missing_or_wrong_token_and_counts_it(cluster: LocalCluster) -> None:
    base = f"{cluster.http_url}/v1"
    before = auth_failures(cluster.router)
    with openai.OpenAI(base_url=base, api_key="mallory-token", max_retries=0) as sdk, \
            pytest.raises(openai.AuthenticationError) as refused:
        sdk.completions.create(model="any", prompt="Hello", max_tokens=2)
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict) and \
        refused.value.body["type"] == "authentication_error"
    no_token = httpx.post(f"{base}/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert no_token.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/models").status_code == 401
    assert httpx.get(f"{base}/no-such-path").status_code == 401  # nothing learnt unauthenticated
    assert httpx.get(f"{cluster.http_url}/health").status_code == 200  # open
    after = auth_failures(cluster.router)
    assert after["http"] - before["http"] == 4 and after["grpc"] == before["grpc"]
    with openai.OpenAI(base_url=base, api_key=TOKENS[0], max_retries=0) as sdk:
        (model,) = sdk.models.list().data
        reply = sdk.completions.create(model=model.id, prompt="Hello", max_tokens=3,
                                       temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_forged_internal_calls_without_the_cluster_secret_are_refused_and_change_nothing(
        cluster: LocalCluster) -> None:
    (decode,) = cluster.workers("decode")
    (prefill,) = cluster.workers("prefill")
    free_before = (await worker_status(decode, SECRET)).load
    forged: list[tuple[str, list[tuple[str, str]]]] = [
        ("none", []), ("dev secret", cluster_auth(LOCAL_DEV_TOKEN)),
        ("the secret itself", [("x-tandem-cluster-auth", SECRET)])]
    async with aio.insecure_channel(decode.address) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        for _name, metadata in forged:  # hog every block with an endless lease
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.Reserve(decode_pb2.ReserveRequest(
                    request_id=f"hog{len(metadata)}", token_ids=list(range(1, 900)),
                    sampling=common_pb2.SamplingParams(max_tokens=8), lease_ms=4294967295),
                    timeout=5, metadata=metadata)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(aio.AioRpcError) as refused:
            await worker_pb2_grpc.WorkerStub(channel).Status(common_pb2.StatusRequest(),
                                                             timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with aio.insecure_channel(prefill.address) as channel:  # aim KV at any blocks
        with pytest.raises(aio.AioRpcError) as refused:
            await prefill_pb2_grpc.PrefillStub(channel).Prefill(
                prefill_pb2.PrefillRequest(request_id="poison", token_ids=[1, 2, 3]), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    after = (await worker_status(decode, SECRET)).load
    assert after.kv_blocks_used == free_before.kv_blocks_used == 0

    # A forged Cancel of a running request does not end it.
    chunks: list[Chunk] = []

    async def victim() -> None:
        async with RouterClient(cluster.router_address, TOKENS[0]) as client:
            async for chunk in client.generate(token_ids=[5, 6, 7, 8], max_tokens=48,
                                               request_id="victim", ignore_eos=True):
                chunks.append(chunk)

    stream = asyncio.create_task(victim())

    async def streaming() -> bool:
        return len(chunks) >= 2
    await wait_until(streaming, what="the victim's tokens streaming")
    async with aio.insecure_channel(decode.address) as channel:
        for _name, metadata in forged:
            with pytest.raises(aio.AioRpcError) as refused:
                await worker_pb2_grpc.WorkerStub(channel).Cancel(
                    common_pb2.CancelRequest(request_id="victim.0", reason="forged"),
                    timeout=5, metadata=metadata)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    await asyncio.wait_for(stream, 120)
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 48
