"""The disaggregated cluster end to end: correctness, prefix reuse, bad input, cancellation.

Real processes on loopback: redis-server, 2 prefill and 2 decode workers (KV over NIXL/UCX),
the router; a real gRPC client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from tests.e2e.helpers import all_counters, blocks_all_free, expected, wait_until

pytestmark = pytest.mark.timeout(300)


def prompts_with_shared_prefixes(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    shared = [torch.randint(3, 500, (80,), generator=gen).tolist() for _ in range(2)]
    prompts = []
    for i in range(n):
        tail = torch.randint(3, 500, (int(torch.randint(1, 40, (1,), generator=gen)),),
                             generator=gen).tolist()
        prompts.append(shared[i % 2][: 40 + i] + tail if i % 2 == 0 else tail * 2)
    return prompts


async def test_32_concurrent_requests_match_transformers(cluster: LocalCluster,
                                                         tiny_llama: Path) -> None:
    prompts = prompts_with_shared_prefixes(32)
    lengths = [4 + i % 13 for i in range(32)]
    async with RouterClient(cluster.router_address) as client:
        results = await asyncio.gather(*(
            client.complete(token_ids=p, max_tokens=n, ignore_eos=True, timeout=120)
            for p, n in zip(prompts, lengths, strict=True)))
    for i, (prompt, n, result) in enumerate(zip(prompts, lengths, results, strict=True)):
        assert result.token_ids == expected(tiny_llama, prompt, n), f"request {i}"
        assert result.finish_reason == "length" and result.completion_tokens == n
        assert result.prompt_tokens == len(prompt)
    await wait_until(lambda: blocks_all_free(cluster), what="every block free again")
    stats = await all_counters(cluster)
    assert sum(c.get("prefill_requests", 0) for c in stats.values()) >= 32


async def test_prefix_reuse_computes_and_sends_less(cluster: LocalCluster,
                                                    tiny_llama: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 500, (160,), generator=gen).tolist()
    first, second = prefix + [5, 6, 7], prefix + [8, 9]
    async with RouterClient(cluster.router_address) as client:
        a = await client.complete(token_ids=first, max_tokens=4, ignore_eos=True)
        await asyncio.sleep(1.0)  # block events reach the index, status reaches the router
        before = await all_counters(cluster)
        b = await client.complete(token_ids=second, max_tokens=4, ignore_eos=True)
        after = await all_counters(cluster)
    assert a.token_ids == expected(tiny_llama, first, 4)
    assert b.token_ids == expected(tiny_llama, second, 4)
    assert a.cached_tokens == 0 and b.cached_tokens == 160
    computed = sum(after[w]["prefill_tokens_computed"] - before[w]["prefill_tokens_computed"]
                   for w in after if w.startswith("prefill"))
    sent = sum(after[w]["kv_blocks_sent"] - before[w]["kv_blocks_sent"]
               for w in after if w.startswith("prefill"))
    assert computed == len(second) - 160  # only the tail was computed on P
    assert sent == 1  # D already held the 10 prefix blocks: only the tail block moved


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "prompt"),
    ({"text": "hello", "token_ids": [5, 6]}, "prompt"),
    ({"token_ids": list(range(3, 2060))}, "token_ids"),
    ({"token_ids": [5, 99999]}, "token_ids"),
    ({"token_ids": [5, 6], "max_tokens": 0}, "sampling.max_tokens"),
    ({"token_ids": [5, 6], "top_p": 1.5}, "sampling.top_p"),
    ({"token_ids": [5, 6], "temperature": -1.0}, "sampling.temperature"),
    ({"token_ids": [5, 6], "stop_token_ids": [100000]}, "sampling.stop_token_ids"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(
        cluster: LocalCluster, tiny_llama: Path, kwargs: dict[str, object], field: str) -> None:
    async with RouterClient(cluster.router_address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.complete(**kwargs)  # type: ignore[arg-type]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(f"{field}:")
        ok = await client.complete(token_ids=[5, 6, 7], max_tokens=3, ignore_eos=True)
    assert ok.token_ids == expected(tiny_llama, [5, 6, 7], 3)


async def test_stop_string_and_status(cluster: LocalCluster) -> None:
    async with RouterClient(cluster.router_address) as client:
        full = await client.complete(text="The quick brown fox", max_tokens=12, ignore_eos=True)
        stop = full.text[3:6]
        assert stop
        cut = await client.complete(text="The quick brown fox", max_tokens=12,
                                    ignore_eos=True, stop=[stop])
        status = await client.status()
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    roles = sorted(w.role for w in status.workers)
    assert roles == [1, 1, 2, 2] and status.prefix_index_mode == 1
    assert status.policy == "kv_aware" and not status.pair_errors


async def test_client_cancel_frees_blocks_everywhere(cluster: LocalCluster) -> None:
    async with RouterClient(cluster.router_address) as client:
        received = 0
        stream = client.generate(token_ids=list(range(10, 200)), max_tokens=1500,
                                 ignore_eos=True)
        async for _chunk in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]  # cancels the call
    assert received == 3
    await wait_until(lambda: blocks_all_free(cluster), timeout_s=30,
                     what="blocks freed after cancel")


def test_tandem_generate_streams_to_the_terminal(cluster: LocalCluster) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cli.main", "generate", "The quick brown",
                           "--router", cluster.router_address, "--max-tokens", "5",
                           "--ignore-eos"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("[length, 5 tokens]")
    bad = subprocess.run([sys.executable, "-m", "cli.main", "generate", "x", "--router",
                          cluster.router_address, "--max-tokens", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.max_tokens" in bad.stderr
