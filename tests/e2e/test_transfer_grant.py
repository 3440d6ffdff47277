"""Issue 13's cache-poisoning attack, with the cluster credential in hand (a sniffer of
plaintext gRPC can replay it): forged Prefill calls aimed at a decode worker's blocks, at an
address that is no decode worker, or with an expired grant are refused with
PERMISSION_DENIED before anything is computed, connected or written; the cached prefix keeps
giving the same greedy tokens, and no block leaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from cli.local_cluster import LocalCluster
from cli.router_client import Chunk, RouterClient
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    worker_pb2_grpc,
)
from tests.e2e.helpers import all_counters, blocks_all_free, cluster_auth, wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [(7 * i) % 200 + 3 for i in range(40)]  # 2 full blocks of 16 and a partial one
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("grant-cluster-logs")
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=logs,
                      worker_args=["--num-blocks", str(NUM_BLOCKS)]) as running:
        yield running


async def greedy(cluster: LocalCluster) -> tuple[list[int], int]:
    """The prompt's greedy tokens through the router, and its cached prompt tokens."""
    async with RouterClient(cluster.router_address) as client:
        chunks: list[Chunk] = [c async for c in client.generate(
            token_ids=PROMPT, max_tokens=12, ignore_eos=True)]
    return [t for c in chunks for t in c.token_ids], chunks[-1].cached_tokens


async def test_forged_prefill_targets_are_refused_and_the_cache_stays_right(
        cluster: LocalCluster) -> None:
    (decode,) = cluster.workers("decode")
    (prefill,) = cluster.workers("prefill")
    reference, _ = await greedy(cluster)  # D now caches the prompt's two full blocks
    auth = cluster_auth()  # the replayable credential: every forged call below passes it
    sampling = common_pb2.SamplingParams(max_tokens=4)
    async with aio.insecure_channel(decode.address) as channel:  # the attacker's own lease:
        own = await decode_pb2_grpc.DecodeStub(channel).Reserve(decode_pb2.ReserveRequest(
            request_id="mallory", token_ids=PROMPT[:20], sampling=sampling, lease_ms=60_000),
            timeout=10, metadata=auth)  # a real endpoint and a grant for 2 blocks of its own
        short = await decode_pb2_grpc.DecodeStub(channel).Reserve(decode_pb2.ReserveRequest(
            request_id="mallory-short", token_ids=PROMPT[:20], sampling=sampling, lease_ms=1),
            timeout=10, metadata=auth)
    before = await all_counters(cluster)
    every_block = list(range(NUM_BLOCKS))
    prompt = list(range(3, 3 + 16 * NUM_BLOCKS))  # needs exactly NUM_BLOCKS blocks
    elsewhere = common_pb2.TransferEndpoint(worker_id=decode.worker_id,
                                            metadata=cluster.router_address.encode(),
                                            compat_hash=own.endpoint.compat_hash)
    await asyncio.sleep(0.05)  # the 1 ms lease has ended
    forged = {
        "every block, no grant": prefill_pb2.DecodeTarget(
            endpoint=own.endpoint, block_ids=every_block),
        "every block, the attacker's own grant": prefill_pb2.DecodeTarget(
            endpoint=own.endpoint, block_ids=every_block, grant=own.grant),
        "another address, a real grant": prefill_pb2.DecodeTarget(
            endpoint=elsewhere, block_ids=list(own.block_ids), grant=own.grant),
        "an expired grant": prefill_pb2.DecodeTarget(
            endpoint=short.endpoint, block_ids=list(short.block_ids), grant=short.grant),
    }
    async with aio.insecure_channel(prefill.address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        for name, target in forged.items():
            expired = name == "an expired grant"
            tokens = PROMPT[:20] if expired or "real grant" in name else prompt
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.Prefill(prefill_pb2.PrefillRequest(
                    request_id="short" if expired else "mallory", token_ids=tokens,
                    sampling=sampling, target=target), timeout=10, metadata=auth)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
            assert "target.grant: " in (refused.value.details() or ""), name
    after = await all_counters(cluster)
    # nothing was computed, connected or written
    for counter in ("prefill_requests", "kv_blocks_sent", "connect_failures", "kv_bytes_sent"):
        assert after[prefill.name][counter] == before[prefill.name][counter], counter
    assert after[decode.name]["kv_bytes_received"] == before[decode.name]["kv_bytes_received"]

    tokens, cached = await greedy(cluster)  # the cached prefix still gives the same tokens
    assert cached >= 32 and tokens == reference
    async with aio.insecure_channel(decode.address) as channel:
        await worker_pb2_grpc.WorkerStub(channel).Cancel(
            common_pb2.CancelRequest(request_id="mallory", reason="test over"),
            timeout=10, metadata=auth)

    async def free() -> bool:
        return await blocks_all_free(cluster)
    await wait_until(free, what="every block free")
