"""Aggregated workers and conditional disaggregation end to end: the same greedy tokens as
transformers (and so as the disaggregated path), each request on the route it should take.

One mixed cluster on the tiny Llama: a prefill worker, a decode worker and an aggregated
worker, round robin (which alternates between the aggregated worker and the pair), and
`--local-prefill-max-tokens 16`. Requests go one at a time, so each one's route shows in the
counters it moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from tests.e2e.helpers import all_counters, blocks_all_free, expected, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

THRESHOLD = 16


@pytest.fixture(scope="module")
def mixed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("mixed-cluster-logs")
    with LocalCluster(tiny_llama, prefill=1, decode=1, aggregated=1, log_dir=logs,
                      worker_args=["--num-blocks", "128"],
                      router_args=["--policy", "round_robin", "--local-prefill-max-tokens",
                                   str(THRESHOLD)]) as running:
        yield running


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def moved(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
          worker: str, name: str) -> float:
    return after[worker].get(name, 0) - before[worker].get(name, 0)


async def test_every_route_gives_the_greedy_tokens(mixed: LocalCluster,
                                                   tiny_llama: Path) -> None:
    [p] = [w.name for w in mixed.workers("prefill")]
    [d] = [w.name for w in mixed.workers("decode")]
    [a] = [w.name for w in mixed.workers("aggregated")]
    # each prompt twice in a row: round robin sends one of the two to A, the other to the pair
    prompts = [prompt(n, seed) for seed, n in enumerate([40, 9, 52, 16]) for _ in range(2)]
    routes: list[str] = []
    async with RouterClient(mixed.router_address) as client:
        for i, tokens in enumerate(prompts):
            before = await all_counters(mixed)
            result = await client.complete(token_ids=tokens, max_tokens=6, ignore_eos=True,
                                           timeout=120)
            after = await all_counters(mixed)
            assert result.token_ids == expected(tiny_llama, tokens, 6), f"request {i}"
            assert result.cached_tokens == 0
            assert result.finish_reason == "length" and result.completion_tokens == 6
            if moved(before, after, a, "routed_prefills"):
                routes.append("aggregated")
                assert moved(before, after, a, "prefill_tokens_computed") == len(tokens)
            elif moved(before, after, d, "routed_prefills"):
                routes.append("short")
                assert len(tokens) <= THRESHOLD, f"request {i}: a long prompt skipped P"
            else:
                routes.append("transfer")
                assert moved(before, after, p, "prefill_requests") == 1
                assert moved(before, after, d, "transfers_completed") == 1
                assert len(tokens) > THRESHOLD, f"request {i}: a short prompt was sent to P"
            assert moved(before, after, a, "kv_bytes_received") == 0  # never a transfer
        status = await client.status()
    assert routes.count("aggregated") == 4, routes
    assert routes.count("short") == routes.count("transfer") == 2, routes
    assert status.counters["local_prefills/aggregated"] == routes.count("aggregated")
    assert status.counters["local_prefills/short_prompt"] == routes.count("short")
    await wait_until(lambda: blocks_all_free(mixed), what="every block free again")


async def test_a_cached_prefix_leaves_a_short_tail_to_prefill_on_d(mixed: LocalCluster,
                                                                    tiny_llama: Path) -> None:
    """A long prompt whose prefix the decode worker holds has a short uncached part: it is
    prefilled there, from the cached blocks, with no transfer."""
    [d] = [w.name for w in mixed.workers("decode")]
    base = prompt(64, 99)
    async with RouterClient(mixed.router_address) as client:
        for _ in range(2):  # the first goes to the pair or to A (round robin); then the pair
            stats = await all_counters(mixed)
            await client.complete(token_ids=base + [7], max_tokens=3, ignore_eos=True)
            if moved(stats, await all_counters(mixed), d, "transfers_completed"):
                break
        else:
            pytest.fail("round robin never sent the long prompt to the pair")
        await client.complete(token_ids=prompt(20, 5), max_tokens=2, ignore_eos=True)  # to A
        before = await all_counters(mixed)
        tail = base + [9, 10, 11]
        result = await client.complete(token_ids=tail, max_tokens=5, ignore_eos=True)
        after = await all_counters(mixed)
    assert result.token_ids == expected(tiny_llama, tail, 5)
    assert moved(before, after, d, "routed_prefills") == 1
    assert result.cached_tokens == 64  # the prefix's 4 blocks of 16 were held on D
    assert moved(before, after, d, "prefill_tokens_computed") == len(tail) - 64
    await wait_until(lambda: blocks_all_free(mixed), what="every block free again")


async def test_a_local_route_ends_at_its_first_token(mixed: LocalCluster,
                                                     tiny_llama: Path) -> None:
    """max_tokens 1, a stop token and a stop string met by the first token: the local stream
    ends (or is closed unread) and every block comes back."""
    short = prompt(8, 123)  # local on whichever route: A, or D as a short prompt
    want = expected(tiny_llama, short, 4)
    async with RouterClient(mixed.router_address) as client:
        full = await client.complete(token_ids=short, max_tokens=4, ignore_eos=True)
        for _ in range(2):  # both routes, round robin
            one = await client.complete(token_ids=short, max_tokens=1, ignore_eos=True)
            assert (one.token_ids, one.finish_reason) == (want[:1], "length")
            stopped = await client.complete(token_ids=short, max_tokens=4,
                                            stop_token_ids=[want[0]])
            assert (stopped.token_ids, stopped.finish_reason) == (want[:1], "stop")
            first_text = full.text[:1]
            if first_text.strip():
                cut = await client.complete(token_ids=short, max_tokens=4, ignore_eos=True,
                                            stop=[first_text])
                assert cut.finish_reason == "stop" and first_text not in cut.text
                assert full.text.startswith(cut.text)
    await wait_until(lambda: blocks_all_free(mixed), what="every block free again")
