"""`python -m router --model DIR --redis-url URL` (also `tandem router ...`): the router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from cluster.grpc_server import ServiceBinding, start_server
from index.prefix_index import PrefixIndexReader
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisConfig, connect
from index.registry import WorkerRegistry
from observability.logging_setup import setup_logging
from observability.metrics import serve_metrics
from observability.tracing import setup_tracing
from router.config import RouterConfig, add_router_args, router_config_from_args
from router.prefix import IndexSource, PrefixLookup, TailSource
from router.router import Router
from router.service import RouterServicer
from router.workers import WorkerPool
from tandem_proto.tandem.v1 import router_pb2_grpc

log = logging.getLogger("router")
READY_PREFIX = "TANDEM_READY"


async def build_router(config: RouterConfig) -> Router:
    redis_cfg = RedisConfig(url=config.redis_url, namespace=config.namespace)
    redis = connect(redis_cfg)
    pool = WorkerPool(WorkerRegistry(redis, redis_cfg), config.block_size, config.hash_seed,
                      config.refresh_interval_s)
    await pool.start()
    source: IndexSource
    if config.prefix_index == "tail":
        tail = TailSource(PrefixIndexTail(redis, redis_cfg), lambda: list(pool.workers))
        tail.start()
        source = tail
    else:
        source = PrefixIndexReader(redis, redis_cfg)
    return Router(config, pool, PrefixLookup(source, config.index_retry_s))


async def serve(config: RouterConfig) -> None:
    router = await build_router(config)
    server = await start_server([ServiceBinding(
        "tandem.v1.Router", router_pb2_grpc.add_RouterServicer_to_server,
        RouterServicer(router))], config.listen)
    address = f"{config.listen.rsplit(':', 1)[0]}:{server.port}"
    metrics_server = None
    if config.metrics_listen:
        host, port = config.metrics_listen.rsplit(":", 1)
        metrics_server = serve_metrics(router.registry, host, int(port))
        print(f"TANDEM_METRICS {metrics_server.address}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"{READY_PREFIX} router router {address}", flush=True)
    log.info("router serving on %s (policy %s)", address, config.policy)
    await stopping.wait()
    log.info("router shutting down")
    await server.stop(10.0)
    await router.pool.close()
    if metrics_server is not None:
        metrics_server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tandem router", description=__doc__)
    add_router_args(parser)
    config = router_config_from_args(parser.parse_args(argv))
    setup_logging()
    setup_tracing("tandem-router")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
