"""The worker sources the router can use, by its `discovery` field, and the fallback counters
each one exports (`RouterMetrics.watch_fallbacks`)."""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from discovery.base import WorkerSource
from discovery.kubernetes import PodWatcher
from index.registry import WorkerRegistry
from router.config import RouterConfig


def _redis(config: RouterConfig, redis: Redis) -> WorkerSource:
    return WorkerRegistry(redis, config.redis_config())


def _kubernetes(config: RouterConfig, redis: Redis) -> WorkerSource:
    return PodWatcher(config.kubernetes)


WORKER_SOURCES: dict[str, Callable[[RouterConfig, Redis], WorkerSource]] = {
    "redis": _redis,
    "kubernetes": _kubernetes,
}


def worker_source(config: RouterConfig, redis: Redis) -> WorkerSource:
    """The source `config.discovery` names (the Redis client serves the registry)."""
    return WORKER_SOURCES[config.discovery](config, redis)


def source_fallbacks(source: WorkerSource) -> dict[str, Callable[[], float]]:
    """`RouterMetrics.watch_fallbacks` arguments for `source`'s own counters."""
    if isinstance(source, WorkerRegistry):
        return {"registry_list_failures": lambda: source.list_failures}
    if isinstance(source, PodWatcher):
        return {"discovery_relists": lambda: source.relists,
                "discovery_watch_drops": lambda: source.watch_drops,
                "discovery_errors": lambda: source.errors,
                "discovery_forbidden": lambda: source.forbidden}
    return {}
