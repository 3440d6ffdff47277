"""`python -m router --model DIR --redis-url URL` (also `tandem router ...`): the router."""

from __future__ import annotations

import argparse
import asyncio
import logging

from grpc import aio

from cluster.addresses import is_loopback, split_host_port
from cluster.grpc_server import ServiceBinding
from cluster.process import ProcessOptions, serve_until_stopped
from index.prefix_index import PrefixIndexReader
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisAuthFailed, check_auth, connect
from observability.logging_setup import setup_logging
from observability.tracing import setup_tracing
from openai_api.app import build_app
from openai_api.server import HttpServer
from router.api_tokens import ApiTokens, public_interceptor
from router.config import RouterConfig, router_flags
from router.prefix import IndexSource, PrefixLookup, TailSource
from router.router import Router
from router.service import RouterServicer
from router.sources import source_fallbacks, worker_source
from router.token_streams import TokenStreams
from router.workers import WorkerPool
from tandem_proto.tandem.v1 import router_pb2_grpc

log = logging.getLogger(__name__)


async def build_router(config: RouterConfig) -> Router:
    redis_cfg = config.redis_config()
    redis = connect(redis_cfg)
    await check_auth(redis, redis_cfg)  # a refused password ends the router at start
    workers = worker_source(config, redis)  # `discovery`: the registry or the pod watch
    pool = WorkerPool(workers, config)
    await pool.start()
    source: IndexSource
    tail: PrefixIndexTail | None = None
    if config.prefix_index == "tail":
        tail = PrefixIndexTail(redis, redis_cfg)
        tail_source = TailSource(tail, pool.listed, config.tail_sync_interval_s,
                                 config.tail_stale_after_s)
        tail_source.start()
        source = tail_source
    else:
        source = PrefixIndexReader(redis, redis_cfg)
    lookup = PrefixLookup(source, config.index_retry_s)
    router = Router(config, pool, lookup)
    router.metrics.watch_fallbacks(
        prefix_tail_reloads=(lambda: tail.reloads) if tail is not None else None,
        prefix_tail_sync_failures=(lambda: tail.sync_failures) if tail is not None else None,
        prefix_tail_drops=(lambda: tail.drops) if tail is not None else None,
        index_mode_transitions=lambda: lookup.transitions, **source_fallbacks(workers))
    if tail is not None:
        router.metrics.watch_resyncs(lambda: tail.resyncs)
    return router


async def serve(config: RouterConfig) -> None:
    """gRPC and (unless `http_listen` is empty) the OpenAI HTTP API, one router behind both,
    until SIGTERM: then neither takes new requests, both give those in flight the grace."""
    tokens = api_tokens(config)
    router = await build_router(config)
    options = ProcessOptions(name=f"router (policy {config.policy})", listen=config.listen,
                             metrics_registry=router.registry,
                             metrics_listen=config.metrics_listen, tls=config.tls)
    options.interceptors = grpc_interceptors(router, tokens)
    options.grpc_options = [("grpc.max_receive_message_length", config.max_request_bytes)]
    streams = TokenStreams(config.max_streams_per_token) if tokens is not None else None
    http = HttpServer(build_app(router, tokens, streams), config.http_listen, options.grace_s,
                      tls=config.tls.uvicorn_options()) if config.http_listen else None
    try:
        if http is not None:
            address = await http.start()
            log.info("OpenAI API on %s://%s/v1 (model %r)", config.tls.scheme, address,
                     config.model_name)
            options.on_stopping = http.begin_stop
        await serve_until_stopped([router_binding(router, streams)], options)
    finally:
        if http is not None:
            await http.stop()
        await router.close()


def router_binding(router: Router, streams: TokenStreams | None = None) -> ServiceBinding:
    """The public `tandem.v1.Router` service over `router` (with `streams`: generations per
    API token bounded)."""
    return ServiceBinding("tandem.v1.Router", router_pb2_grpc.add_RouterServicer_to_server,
                          RouterServicer(router, streams))


def grpc_interceptors(router: Router, tokens: ApiTokens | None) -> list[aio.ServerInterceptor]:
    """With `tokens`: the bearer-token check of `tandem.v1.Router`, refusals counted."""
    if tokens is None:
        return []
    refused = router.metrics.auth_failures.labels("grpc")
    return [public_interceptor(tokens, lambda _method: refused.inc())]


def api_tokens(config: RouterConfig) -> ApiTokens | None:
    """The public API's tokens (`api_tokens_file`); unset: none, with a warning when the API
    listens on an address other machines may reach."""
    if config.api_tokens_file is not None:
        tokens = ApiTokens.load(config.api_tokens_file)
        log.info("public API: %d bearer token(s) from %s", len(tokens.tokens),
                 config.api_tokens_file)
        return tokens
    exposed = [a for a in (config.listen, config.http_listen)
               if a and not is_loopback(split_host_port(a)[0])]
    if exposed:
        log.warning("api_tokens_file is unset: the public API on %s takes requests from "
                    "anyone (set --api-tokens-file or TANDEM_API_TOKENS_FILE)",
                    ", ".join(exposed))
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tandem router", description=__doc__)
    flags = router_flags()
    flags.add_to(parser)
    config = flags.parse(parser, argv)
    try:
        config.tls.require_choice()
    except ValueError as error:
        parser.error(str(error))
    setup_logging()
    setup_tracing("tandem-router")
    try:
        asyncio.run(serve(config))
    except RedisAuthFailed as error:  # a configuration error: say so, no traceback
        raise SystemExit(f"tandem router: {error}") from None


if __name__ == "__main__":
    main()
