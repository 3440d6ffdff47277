"""Redis with a password, shared by two clusters, on a real redis-server with `requirepass`:

- a missing or wrong password is `RedisAuthFailed`, saying so, from every operation; the router
  process refuses to start with it, naming the problem, not a traceback;
- a Redis serving TLS only (with a password) is reached with `rediss://...?ssl_ca_certs=`, and
  not in plaintext nor by a client trusting another CA;
- two clusters with different namespaces in one Redis, with the same worker ids and the same
  blocks, keep their registries and prefix indexes (Redis lookups and the router's tail copy)
  apart, and every key either writes starts with its namespace.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from cli.redis_server import LocalRedisServer
from cli.throwaway_ca import make_ca, write_cluster_certs
from cluster.errors import IndexUnavailable
from cluster.roles import Role
from engine.block_hash import hash_prompt_blocks
from index.prefix_index import PrefixIndexReader, PrefixIndexWriter
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisAuthFailed, RedisConfig, check_auth, connect
from index.registry import LoadReport, WorkerRecord, WorkerRegistry

PASSWORD = "s3cret-pw"
HASHES = hash_prompt_blocks(list(range(64)), 4)  # 16 blocks


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer(password=PASSWORD) as redis:
        yield redis


def config(url: str, namespace: str = "tandem") -> RedisConfig:
    return RedisConfig(url=url, namespace=namespace, op_timeout_s=2.0)


@pytest.fixture
async def admin(server: LocalRedisServer) -> AsyncIterator[Redis]:
    client = connect(config(server.url))
    await client.flushall()
    yield client
    await client.aclose()


@pytest.mark.parametrize("url_auth", ["", ":wrong-pw@"], ids=["missing", "wrong"])
async def test_a_missing_or_wrong_password_says_so(server: LocalRedisServer,
                                                   url_auth: str) -> None:
    cfg = config(f"redis://{url_auth}{server.host}:{server.port}/0")
    client = connect(cfg)
    try:
        with pytest.raises(RedisAuthFailed, match="wrong or missing password.*redis_url"):
            await check_auth(client, cfg)
        with pytest.raises(RedisAuthFailed, match="redis list workers failed: Redis refused"):
            await WorkerRegistry(client, cfg).list_workers()
    finally:
        await client.aclose()
    right = connect(config(server.url))
    try:
        await check_auth(right, config(server.url))  # the password in the URL: no error
    finally:
        await right.aclose()


async def test_an_unreachable_redis_is_not_an_auth_failure() -> None:
    cfg = config("redis://127.0.0.1:1/0")  # nobody listens: workers retry, no refusal
    client = connect(cfg)
    try:
        await check_auth(client, cfg)
    finally:
        await client.aclose()


def test_the_router_refuses_to_start_with_a_password_redis_refuses(
        server: LocalRedisServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "router", "--model", "/unused", "--insecure-plaintext",
         "--redis-url", f"redis://:wrong-pw@{server.host}:{server.port}/0",
         "--metrics-listen", "", "--http-listen", ""],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "tandem router: redis ping failed: Redis refused the credentials" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_tls_redis_takes_rediss_with_the_ca_and_refuses_the_rest(tmp_path: Path) -> None:
    certs = write_cluster_certs(tmp_path / "certs")
    (tmp_path / "other-ca.pem").write_bytes(make_ca("another CA").cert_pem())
    with LocalRedisServer(password=PASSWORD, tls=certs) as server:
        assert server.url.startswith(f"rediss://:{PASSWORD}@") and "ssl_ca_certs=" in server.url
        good = config(server.url)
        client = connect(good)
        try:
            await check_auth(client, good)
            await WorkerRegistry(client, good, ttl_s=60).heartbeat(record("d0", "10.0.0.1:1"))
            assert [w.worker_id for w in await WorkerRegistry(client, good).list_workers()] == \
                ["d0"]
        finally:
            await client.aclose()
        plain = f"redis://:{PASSWORD}@{server.host}:{server.port}/0"
        untrusted = server.url.replace(str(certs.ca), str(tmp_path / "other-ca.pem"))
        for url in (plain, untrusted):
            cfg = RedisConfig(url=url, op_timeout_s=1.0)
            bad = connect(cfg)
            try:
                with pytest.raises(IndexUnavailable) as failed:
                    await WorkerRegistry(bad, cfg).list_workers()
                assert not isinstance(failed.value, RedisAuthFailed), url
            finally:
                await bad.aclose()


def record(worker_id: str, address: str) -> WorkerRecord:
    return WorkerRecord(worker_id, Role.DECODE, address, transfer_metadata=b"m",
                        load=LoadReport(kv_blocks_total=64), started_unix_ms=1)


async def test_two_clusters_share_one_redis_without_mixing(server: LocalRedisServer,
                                                           admin: Redis) -> None:
    alpha, beta = config(server.url, "alpha"), config(server.url, "beta")
    client = connect(alpha)  # one connection pool serves both: only the keys differ
    try:
        # the same worker id in both clusters, at different addresses
        await WorkerRegistry(client, alpha, ttl_s=60).heartbeat(record("d0", "10.0.0.1:1"))
        await WorkerRegistry(client, beta, ttl_s=60).heartbeat(record("d0", "10.0.0.2:1"))
        await WorkerRegistry(client, beta, ttl_s=60).heartbeat(record("d1", "10.0.0.2:2"))
        (a_d0,) = await WorkerRegistry(client, alpha).list_workers()
        assert a_d0.address == "10.0.0.1:1"
        assert {(w.worker_id, w.address) for w in await WorkerRegistry(client, beta)
                .list_workers()} == {("d0", "10.0.0.2:1"), ("d1", "10.0.0.2:2")}

        # alpha's d0 holds 10 blocks of the prompt, beta's d0 holds 4 of them
        for cfg, held in ((alpha, HASHES[:10]), (beta, HASHES[:4])):
            writer = PrefixIndexWriter(client, cfg, "d0")
            await writer.start()
            writer.stored(held)
            await writer.flush()
        assert await PrefixIndexReader(client, alpha).lookup(HASHES) == {"d0": 10}
        assert await PrefixIndexReader(client, beta).lookup(HASHES) == {"d0": 4}
        tails = {cfg.namespace: PrefixIndexTail(client, cfg) for cfg in (alpha, beta)}
        for tail in tails.values():
            await tail.sync(["d0"])
        assert tails["alpha"].lookup(HASHES) == {"d0": 10}
        assert tails["beta"].lookup(HASHES) == {"d0": 4}

        # one cluster's worker leaving changes nothing in the other
        await WorkerRegistry(client, beta).deregister("d0")
        removing = PrefixIndexWriter(client, beta, "d0")
        await removing.remove()
        assert [w.worker_id for w in await WorkerRegistry(client, alpha).list_workers()] == \
            ["d0"]
        assert await PrefixIndexReader(client, alpha).lookup(HASHES) == {"d0": 10}
        assert await PrefixIndexReader(client, beta).lookup(HASHES) == {}

        keys = [k.decode() async for k in admin.scan_iter()]
        assert keys and all(k.startswith(("alpha:", "beta:")) for k in keys), keys
    finally:
        await client.aclose()
