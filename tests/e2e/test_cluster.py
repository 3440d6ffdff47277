"""The disaggregated cluster end to end: correctness, prefix reuse and cache salts, the
workers' status counters, bad input, cancellation.

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
from tandem_proto.tandem.v1 import common_pb2
from tests.e2e.helpers import (
    all_counters,
    blocks_all_free,
    expected,
    wait_until,
    worker_status,
)

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


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], name: str,
          role: str) -> float:
    """How much `name` grew, summed over the workers of `role`."""
    return sum(after[w].get(name, 0) - before[w].get(name, 0) for w in after
               if w.startswith(role))


def served(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> set[str]:
    """The prefill workers that took a request between the two readings."""
    return {w for w in after if w.startswith("prefill") and
            after[w]["prefill_requests"] > before[w]["prefill_requests"]}


async def test_cache_salt_keeps_prefix_caches_apart(cluster: LocalCluster,
                                                    tiny_llama: Path) -> None:
    prompt = random_prompt(100, 21)  # 6 full blocks of 16, and 4 tokens
    want = expected(tiny_llama, prompt, 3)
    async with RouterClient(cluster.router_address) as client:
        start = await all_counters(cluster)
        salted = await client.complete(token_ids=prompt, max_tokens=3, ignore_eos=True,
                                       cache_salt="tenant-a")
        await asyncio.sleep(1.0)  # block events reach the index, status reaches the router
        # other salts, and none: nothing of tenant-a's cache is used, on P or on D
        before = await all_counters(cluster)
        holders = served(start, before)  # the prefill worker that cached tenant-a's prompt
        others = [await client.complete(token_ids=prompt, max_tokens=3, ignore_eos=True,
                                        cache_salt=salt) for salt in ("tenant-b", "tenant-c")]
        others.append(await client.complete(token_ids=prompt, max_tokens=3, ignore_eos=True))
        after = await all_counters(cluster)
        # the same salt again: a prefix hit
        await asyncio.sleep(1.0)
        again = await client.complete(token_ids=prompt, max_tokens=3, ignore_eos=True,
                                      cache_salt="tenant-a")
    assert [r.token_ids for r in [salted, *others, again]] == [want] * 5  # salts change no token
    assert salted.cached_tokens == 0
    assert [r.cached_tokens for r in others] == [0, 0, 0]
    assert delta(before, after, "prefill_tokens_computed", "prefill") == 3 * len(prompt)
    assert delta(before, after, "kv_blocks_sent", "prefill") == 3 * 7  # D reused none either
    assert delta(before, after, "cached_prompt_tokens", "decode") == 0
    # the worker holding tenant-a's prompt served some of those: it really missed
    assert len(holders) == 1 and holders & served(before, after), (holders, before, after)
    assert again.cached_tokens == 96


async def test_status_counters_count_every_request_and_gauges_return_to_zero(
        cluster: LocalCluster, tiny_llama: Path) -> None:
    await wait_until(lambda: blocks_all_free(cluster), what="a quiet cluster")
    prompts = [random_prompt(20 + 9 * i, 300 + i) for i in range(6)]
    n_tokens = 5
    before = await all_counters(cluster)
    async with RouterClient(cluster.router_address) as client:
        results = await asyncio.gather(*(
            client.complete(token_ids=p, max_tokens=n_tokens, ignore_eos=True, timeout=120)
            for p in prompts))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == expected(tiny_llama, prompt, n_tokens)
    await wait_until(lambda: blocks_all_free(cluster), what="every block free again")
    after = await all_counters(cluster)
    n = len(prompts)
    blocks = sum(-(-len(p) // 16) for p in prompts)
    assert delta(before, after, "prefill_requests", "prefill") == n
    assert delta(before, after, "prefill_tokens_computed", "prefill") == sum(map(len, prompts))
    assert delta(before, after, "kv_blocks_sent", "prefill") == blocks
    assert delta(before, after, "reservations", "decode") == n
    assert delta(before, after, "transfers_completed", "decode") == n
    # one decode step per token after the first (which the prefill worker sampled)
    assert delta(before, after, "decode_tokens_computed", "decode") == n * (n_tokens - 1)
    sent = delta(before, after, "kv_bytes_sent", "prefill")
    assert sent > 0 and delta(before, after, "kv_bytes_received", "decode") == sent
    for name, role in [("transfer_failures", "prefill"), ("connect_failures", "prefill"),
                       ("transfers_failed", "decode"), ("local_prefills", "decode"),
                       ("routed_prefills", "decode"),
                       ("lease_expiries", "decode"), ("cached_prompt_tokens", "decode"),
                       ("prefill_tokens_computed", "decode"), ("decode_tokens_computed",
                                                               "prefill"),
                       ("prefix_hit_tokens", "prefill"), ("preemptions", "")]:
        assert delta(before, after, name, role) == 0, name

    # counters are cumulative (none went down), gauges are current (back to rest)
    statuses = await asyncio.gather(*(worker_status(p) for p in
                                      cluster.workers("prefill") + cluster.workers("decode")))
    for status in statuses:
        role = "prefill" if status.role == common_pb2.WORKER_ROLE_PREFILL else "decode"
        assert set(status.counters) == COUNTERS[role], status.worker_id
        assert set(status.gauges) == GAUGES[role], status.worker_id
        assert all(after[status.worker_id][k] >= before[status.worker_id][k]
                   for k in status.counters)
        resting = {k: v for k, v in status.gauges.items() if k not in ("kv_blocks_free",
                                                                        "kv_blocks_total")}
        assert resting == dict.fromkeys(resting, 0.0), (status.worker_id, resting)
        assert status.load.queued_prompt_blocks == 0


ENGINE_COUNTERS = {"prefill_tokens_computed", "decode_tokens_computed", "prefix_hit_tokens",
                   "preemptions"}
COUNTERS = {
    "prefill": ENGINE_COUNTERS | {"prefill_requests", "kv_blocks_sent", "transfer_failures",
                                  "connect_failures", "kv_bytes_sent"},
    "decode": ENGINE_COUNTERS | {"reservations", "lease_expiries", "local_prefills",
                                 "routed_prefills",
                                 "transfers_completed", "transfers_failed",
                                 "cached_prompt_tokens", "kv_bytes_received"},
}
ENGINE_GAUGES = {"requests", "running", "waiting", "kv_blocks_free", "kv_blocks_total"}
GAUGES = {"prefill": ENGINE_GAUGES | {"pushes"},
          "decode": ENGINE_GAUGES | {"reservations_waiting"}}


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
    await wait_until(lambda: blocks_all_free(cluster), what="blocks freed after a stop string")


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
