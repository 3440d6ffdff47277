"""The instant worker (loadtest/scripts/instant_worker.py) as the router bench uses it: real
processes (redis-server, 2 instant prefill + 2 instant decode workers, the real router), a short
`loadtest run` through the router, a prefix the router finds again, the direct baseline, and the
cluster secret its internal services require."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from loadtest.cli import main
from tandem_proto.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, worker_pb2_grpc

SCRIPT = Path(__file__).parents[3] / "loadtest" / "scripts" / "instant_worker.py"


def _instant() -> Any:
    spec = importlib.util.spec_from_file_location("instant_worker", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOKEN = _instant().TOKEN


@pytest.fixture(scope="module")
def cluster(tiny_chat_llama: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(tiny_chat_llama, prefill=2, decode=2,
                           log_dir=tmp_path_factory.mktemp("instant-cluster-logs"))
    try:
        running.redis.start()
        workers = [running.spawn(role, program=[sys.executable, str(SCRIPT), "--role", role])
                   for role in ("prefill", "prefill", "decode", "decode")]
        router = running.spawn("router", ["--policy", "kv_aware"])
        for process in [*workers, router]:
            running.wait_ready(process)
        running.wait_for_workers(4)
        yield running
    finally:
        running.stop()


def requests_served(cluster: LocalCluster, role: str) -> int:
    """The Reserve (decode) or Prefill (prefill) calls the `role` workers answered."""
    total = 0
    for worker in cluster.workers(role):
        with cluster.grpc_channel(worker.address) as channel:
            status = worker_pb2_grpc.WorkerStub(channel).Status(
                common_pb2.StatusRequest(), timeout=5,
                metadata=[("x-tandem-cluster-auth", _credential())])
        assert status.worker_id == worker.name and status.block_size == 16
        total += int(status.counters["requests"])
    return total


def _credential() -> str:
    from cluster.cluster_secret import LOCAL_DEV_TOKEN, credential

    return credential(LOCAL_DEV_TOKEN)


@pytest.mark.slow
def test_a_short_run_through_the_router_uses_every_hop(cluster: LocalCluster,
                                                      tiny_chat_llama: Path,
                                                      tmp_path: Path) -> None:
    before = {role: requests_served(cluster, role) for role in ("prefill", "decode")}
    out = tmp_path / "run"
    status = main(["run", "--address", cluster.router_address,
                   "--tokenizer", str(tiny_chat_llama), "--input-len", "64",
                   "--output-len", "1", "--concurrency", "4", "--max-requests", "40",
                   "--duration", "30", "--out", str(out), "--no-progress", "--name", "instant"])
    assert status == 0
    point = json.loads((out / "run.json").read_text())["points"][0]
    assert point["summary"]["requests"]["ok"] == 40
    assert point["summary"]["requests"]["errors"] == 0
    assert point["cluster"]["requests"] == 40 and point["cluster"]["retries"] == 0
    assert point["cluster"]["policy"] == "kv_aware"
    assert all(r["completion_tokens"] == 1 and r["finish_reason"] == "length"
               for r in point["records"])
    after = {role: requests_served(cluster, role) for role in ("prefill", "decode")}
    # every request reserved on a decode worker and prefilled on a prefill worker
    assert after["decode"] - before["decode"] == 40
    assert after["prefill"] - before["prefill"] == 40


@pytest.mark.slow
async def test_the_router_finds_a_prompt_it_sent_before(cluster: LocalCluster) -> None:
    """The workers publish what they hold: kv_aware sends the prompt back to them, and the
    usage counts the cached blocks (3 of the 64 tokens' 4: the last token is computed)."""
    prompt = list(range(100, 164))
    async with RouterClient(cluster.router_address) as client:
        first = [c async for c in client.generate(token_ids=prompt, max_tokens=1,
                                                  cache_salt="again")]
        assert [t for c in first for t in c.token_ids] == [TOKEN]
        assert first[-1].finish_reason == "length" and first[-1].cached_tokens == 0
        for _ in range(50):  # the index is eventually consistent: a few ms here
            await asyncio.sleep(0.1)
            again = [c async for c in client.generate(token_ids=prompt, max_tokens=1,
                                                      cache_salt="again")]
            if again[-1].cached_tokens:
                break
        assert again[-1].cached_tokens == 48


@pytest.mark.slow
async def test_a_decode_worker_answers_a_client_directly(cluster: LocalCluster) -> None:
    async with RouterClient(cluster.workers("decode")[0].address) as client:
        chunks = [c async for c in client.generate(token_ids=[5, 6, 7], max_tokens=4)]
    assert [(c.token_ids, c.finish_reason, c.completion_tokens) for c in chunks] == [
        ([TOKEN], "length", 1)]


@pytest.mark.slow
async def test_its_internal_services_require_the_cluster_secret(cluster: LocalCluster) -> None:
    async with aio.insecure_channel(cluster.workers("decode")[0].address) as channel:
        with pytest.raises(aio.AioRpcError) as refused:
            await decode_pb2_grpc.DecodeStub(channel).Reserve(
                decode_pb2.ReserveRequest(request_id="r", token_ids=[1, 2]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
