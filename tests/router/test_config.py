"""router.config: the router's flags and variables, its tunables reaching the parts that use
them, and one hash seed default shared with the workers."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from cli.redis_server import LocalRedisServer
from cluster.roles import Role
from cluster.worker_config import worker_flags
from engine.block_hash import DEFAULT_HASH_SEED
from index.redis_client import connect
from index.registry import WorkerRegistry
from router.__main__ import build_router
from router.clients import DecodeClient
from router.config import RouterConfig, router_flags
from router.prefix import TailSource
from router.workers import WorkerHandle, WorkerPool
from tandem_proto.tandem.v1 import common_pb2

FLAGS = router_flags()
REQUIRED = ["--model", "/m", "--redis-url", "redis://127.0.0.1:6379/0"]


def build(argv: list[str], environ: dict[str, str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser()
    FLAGS.add_to(parser)
    return FLAGS.build(parser.parse_args(argv), environ=environ or {})


def worker_seed(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    flags = worker_flags()
    flags.add_to(parser)
    config = flags.build(parser.parse_args(["--model", "/m", *argv]), environ={},
                         role=Role.DECODE)
    return config.engine.hash_seed


def test_flags_in_use_keep_working() -> None:
    config = build([*REQUIRED, "--listen", "127.0.0.1:7001", "--metrics-listen", "",
                    "--policy", "round_robin", "--prefix-index", "pipelined",
                    "--block-size", "32", "--max-inflight", "8", "--max-queue", "9",
                    "--queue-timeout-s", "2", "--lease-ms", "100", "--namespace", "ns"])
    assert (config.listen, config.metrics_listen, config.policy, config.prefix_index,
            config.block_size, config.max_inflight, config.max_queue, config.queue_timeout_s,
            config.lease_ms, config.namespace) == (
        "127.0.0.1:7001", "", "round_robin", "pipelined", 32, 8, 9, 2.0, 100, "ns")
    assert build(REQUIRED) == RouterConfig(model="/m", redis_url="redis://127.0.0.1:6379/0")


def test_model_and_redis_are_required() -> None:
    with pytest.raises(ValueError, match=r"model: --model \(or TANDEM_MODEL\) is required"):
        build([])
    with pytest.raises(ValueError, match=r"redis_url: --redis-url \(or TANDEM_REDIS_URL\)"):
        build(["--model", "/m"])
    config = build([], {"TANDEM_MODEL": "/m", "TANDEM_REDIS_URL": "redis://r:1/0",
                        "TANDEM_POLICY": "least_loaded"})
    assert (config.model, config.redis_url, config.policy) == ("/m", "redis://r:1/0",
                                                              "least_loaded")
    with pytest.raises(ValueError, match="TANDEM_POLICY"):
        build(REQUIRED, {"TANDEM_POLICY": "random"})


def test_router_and_workers_share_one_hash_seed_default() -> None:
    """Bug 3: with no seed the router and the workers agree; 0 is a seed like any other."""
    assert build(REQUIRED).hash_seed == worker_seed([]) == DEFAULT_HASH_SEED
    assert build([*REQUIRED, "--hash-seed", "0"]).hash_seed == worker_seed(
        ["--hash-seed", "0"]) == 0
    assert build(REQUIRED, {"TANDEM_HASH_SEED": "0"}).hash_seed == 0


def pool_for(config: RouterConfig) -> WorkerPool:
    redis_cfg = config.redis_config()
    return WorkerPool(WorkerRegistry(connect(redis_cfg), redis_cfg), config)  # Redis unused


def add_decode_worker(pool: WorkerPool, hash_seed: int) -> WorkerHandle:
    channel = aio.insecure_channel("127.0.0.1:1")  # never dialled
    handle = WorkerHandle("d-1", Role.DECODE, "127.0.0.1:1", channel,
                          DecodeClient("d-1", channel, pool.timeouts),
                          status=common_pb2.WorkerStatus(block_size=16, hash_seed=hash_seed))
    pool.workers[handle.worker_id] = handle
    return handle


@pytest.mark.parametrize("argv", [[], ["--hash-seed", "0"]])
async def test_a_worker_configured_like_the_router_is_routed_to(argv: list[str]) -> None:
    pool = pool_for(build([*REQUIRED, *argv]))
    handle = add_decode_worker(pool, worker_seed(argv))
    assert pool.live(Role.DECODE) == [handle] and pool.config_errors() == {}
    assert handle.status is not None
    handle.status.hash_seed = worker_seed(["--hash-seed", "1"])
    assert pool.live(Role.DECODE) == [] and "hash seed 1 differ" in pool.config_errors()["d-1"]
    await pool.close()


async def test_worker_down_time_is_the_configured_one() -> None:
    pool = pool_for(build([*REQUIRED, "--worker-down-s", "0.2"]))
    handle = add_decode_worker(pool, DEFAULT_HASH_SEED)
    pool.mark_down("d-1", "test")
    assert not handle.up
    await asyncio.sleep(0.25)
    assert handle.up
    await pool.close()


@pytest.fixture
def redis_server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


async def test_tunables_reach_the_router_parts(tiny_llama: Path,
                                               redis_server: LocalRedisServer) -> None:
    config = build(["--model", str(tiny_llama), "--redis-url", redis_server.url,
                    "--tail-sync-interval-s", "0.02", "--tail-stale-after-s", "3",
                    "--index-retry-s", "0.3", "--redis-op-timeout-s", "0.7",
                    "--refresh-interval-s", "0.1", "--no-capacity-backoff-s", "0.01",
                    "--cleanup-timeout-s", "2", "--insecure-plaintext"])
    router = await build_router(config)
    try:
        assert router.config is config and router.pool.config is config
        assert router.lookup.retry_s == 0.3
        tail = router.lookup.reader
        assert isinstance(tail, TailSource)
        assert (tail.sync_interval_s, tail.stale_after_s) == (0.02, 3.0)
        assert tail.tail._config.op_timeout_s == 0.7
        assert (config.no_capacity_backoff_s, config.cleanup_timeout_s) == (0.01, 2.0)
    finally:
        await router.close()


def test_help_names_every_variable() -> None:
    parser = argparse.ArgumentParser()
    FLAGS.add_to(parser)
    text = " ".join(parser.format_help().split())
    for setting in FLAGS.settings:
        assert f"{setting.flag} " in text and f"env {setting.env})" in text


def test_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="status_timeout_s: must be > 0"):
        RouterConfig(model="/m", redis_url="redis://h:1/0", status_timeout_s=0)
    with pytest.raises(ValueError, match="worker_down_s: must be >= 0"):
        RouterConfig(model="/m", redis_url="redis://h:1/0", worker_down_s=-1)
    for field, value, message in [("max_migrations", -1, "max_migrations: must be >= 0"),
                                  ("decode_stall_s", 0, "decode_stall_s: must be > 0"),
                                  ("prefill_timeout_s", 0, "prefill_timeout_s: must be > 0")]:
        given: dict[str, Any] = {field: value}
        with pytest.raises(ValueError, match=message):
            RouterConfig(model="/m", redis_url="redis://h:1/0", **given)


def test_migration_settings_have_defaults_that_cannot_fire_on_a_slow_step() -> None:
    config = build(REQUIRED)
    assert config.max_migrations == 2 and config.decode_stall_s == 30.0
    assert build([*REQUIRED, "--max-migrations", "0"]).max_migrations == 0
    assert build(REQUIRED, {"TANDEM_DECODE_STALL_S": "2.5"}).decode_stall_s == 2.5


def test_local_prefill_threshold_is_unset_unless_given() -> None:
    assert build(REQUIRED).local_prefill_max_tokens is None  # always disaggregate
    assert build([*REQUIRED, "--local-prefill-max-tokens", "32"]).local_prefill_max_tokens == 32
    assert build(REQUIRED, {"TANDEM_LOCAL_PREFILL_MAX_TOKENS": "0"}).local_prefill_max_tokens == 0
    with pytest.raises(ValueError, match="^local_prefill_max_tokens: must be >= 0"):
        build([*REQUIRED, "--local-prefill-max-tokens", "-1"])


async def test_incompatible_pairs_follow_the_workers_compat_hashes() -> None:
    """The pool keeps its answer between requests: a changed hash, a new or a removed worker
    changes it."""
    pool = pool_for(build(REQUIRED))
    decode = add_decode_worker(pool, DEFAULT_HASH_SEED)
    assert decode.status is not None
    decode.status.compat_hash = "a"
    channel = aio.insecure_channel("127.0.0.1:1")  # never dialled
    prefill = WorkerHandle("p-1", Role.PREFILL, "127.0.0.1:1", channel,
                           DecodeClient("p-1", channel, pool.timeouts),
                           status=common_pb2.WorkerStatus(compat_hash="a"))
    assert pool.incompatible_pairs() == {}
    pool.workers[prefill.worker_id] = prefill
    assert pool.incompatible_pairs() == {}
    decode.status.compat_hash = "b"
    assert list(pool.incompatible_pairs()) == [("p-1", "d-1")]
    pool.incompatible_pairs().clear()  # a caller's copy: the pool's answer stays
    assert list(pool.incompatible_pairs()) == [("p-1", "d-1")]
    prefill.status = common_pb2.WorkerStatus(compat_hash="b")
    assert pool.incompatible_pairs() == {}
    prefill.status.compat_hash = "c"
    del pool.workers["d-1"]
    assert pool.incompatible_pairs() == {}
    await pool.close()
