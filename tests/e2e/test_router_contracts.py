"""The router's contracts with clients on a real cluster: duplicate ids, huge texts, ids that
would forge log lines, streams a decode worker releases. Real processes on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import Chunk, RouterClient
from tandem_proto.tandem.v1 import common_pb2, worker_pb2_grpc
from tests.e2e.helpers import blocks_all_free, cluster_auth, expected, wait_until

pytestmark = pytest.mark.timeout(300)


async def test_a_duplicate_running_id_gets_already_exists_and_harms_no_one(
        cluster: LocalCluster, tiny_llama: Path) -> None:
    prompt = list(range(30, 70))
    async with RouterClient(cluster.router_address) as client:
        # the first is being served once its first token came, with 399 more to go (a sleep
        # before the duplicate raced the whole first request once it took under 0.3 s)
        first = client.generate(token_ids=prompt, max_tokens=400, ignore_eos=True,
                                request_id="dup")
        tokens = list((await anext(first)).token_ids)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete(token_ids=[5, 6, 7], max_tokens=2, request_id="dup")
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert caught.value.details() == "request_id: 'dup' is already running"
        async for chunk in first:
            tokens += chunk.token_ids
        assert tokens == expected(tiny_llama, prompt, 400)
        status = await client.status()
    assert len(status.workers) == 4 and not status.worker_errors and not status.pair_errors
    await wait_until(lambda: blocks_all_free(cluster), what="every block free again")


async def test_a_huge_text_is_refused_at_once_and_blocks_no_one(cluster: LocalCluster) -> None:
    huge = "the quick brown fox " * 300_000  # 6 MB: under max_request_bytes (8 MiB)
    async with RouterClient(cluster.router_address) as client:
        started = time.monotonic()
        big = asyncio.create_task(client.complete(text=huge, max_tokens=2))
        small = asyncio.create_task(client.complete(token_ids=[5, 6, 7, 8], max_tokens=2,
                                                    ignore_eos=True))
        done = await asyncio.gather(big, small, return_exceptions=True)
        elapsed = time.monotonic() - started
    error, result = done
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("text: 6000000 bytes cannot fit")
    assert not isinstance(result, BaseException) and result.completion_tokens == 2
    assert elapsed < 10.0  # tokenizing it on the event loop took 16 s, and stalled the other


async def test_an_id_that_would_forge_a_log_line_is_refused(cluster: LocalCluster) -> None:
    forged = "x\n2026-12-01 00:00:00,000 CRITICAL forged"
    async with RouterClient(cluster.router_address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete(token_ids=[5, 6], max_tokens=1, request_id=forged)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("request_id: must be 1 to 128")
    assert "CRITICAL forged" not in cluster.router.log()


async def test_a_request_its_decode_worker_releases_ends_cancelled_at_once(
        cluster: LocalCluster) -> None:
    """`Worker.Cancel` on the decode worker (what an operator or a draining worker does) ends
    the client's stream with a finish reason instead of leaving it waiting for its deadline."""
    async with RouterClient(cluster.router_address) as client:
        chunks: list[Chunk] = []

        async def consume() -> None:
            async for chunk in client.generate(token_ids=list(range(40, 90)), max_tokens=1500,
                                               ignore_eos=True, request_id="released"):
                chunks.append(chunk)
        stream = asyncio.create_task(consume())

        async def decoding() -> bool:
            return len(chunks) >= 3
        await wait_until(decoding, what="tokens streaming")
        found = []
        for decode in cluster.workers("decode"):
            async with grpc.aio.insecure_channel(decode.address) as channel:
                reply = await worker_pb2_grpc.WorkerStub(channel).Cancel(
                    common_pb2.CancelRequest(request_id="released.0", reason="test"), timeout=5,
                    metadata=cluster_auth())
            found.append(reply.found)
        assert any(found)
        await asyncio.wait_for(stream, 10)
        status = await client.status()
    assert chunks[-1].finish_reason == "cancelled"
    assert 3 <= chunks[-1].completion_tokens < 1500
    assert status.counters["inflight"] == 0
    await wait_until(lambda: blocks_all_free(cluster), what="every block free again")
