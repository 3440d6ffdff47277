"""`WorkerSource`: a source of worker records, what the router's `WorkerPool` lists."""

from __future__ import annotations

from typing import Protocol

from index.registry import WorkerRecord


class WorkerSource(Protocol):
    """Where the router finds its workers. Two implementations, chosen by the router's
    `discovery` field: `index.registry.WorkerRegistry` (the workers' heartbeats in Redis) and
    `discovery.kubernetes.PodWatcher` (the worker pods, watched through the Kubernetes API).

    The pool calls `start` once, `list_workers` every `refresh_interval_s`, `close` once.
    """

    @property
    def authoritative(self) -> bool:
        """True when a worker missing from a listing is gone (the Kubernetes API: a pod not
        listed is deleted or not ready), so the pool drops it at once; False when a listing may
        miss live workers for a while (Redis restarted empty, workers not re-registered yet),
        so the pool keeps such a worker for `worker_forget_after_s`."""
        ...

    @property
    def problem(self) -> str:
        """Why the source cannot see the workers right now, for the cluster status and the
        logs ("" while it can). Meanwhile the pool routes to the workers it last knew."""
        ...

    async def start(self) -> None:
        """Begins following the workers (a first listing, a background watch); a source that
        cannot reach its backend still starts, says so in `problem` and keeps trying."""
        ...

    async def list_workers(self) -> list[WorkerRecord]:
        """The workers to route to, sorted by id. Raises `cluster.errors.IndexUnavailable`
        when the source cannot answer (the pool keeps its last known workers)."""
        ...

    async def close(self) -> None:
        """Stops following; releases connections."""
        ...
