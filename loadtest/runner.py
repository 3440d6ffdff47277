"""Runs one load point against a target, bounded in time and in request count.

At most `max_requests` are sent; none is sent after `duration_s`, and whatever is still in
flight then is cancelled and recorded as `cancelled`, so every run stops by itself. Open loop
sends each request at its arrival time whatever the server is doing; closed loop keeps
`concurrency` requests in flight, each sent as soon as one ends. The cluster's counters are
read before and after (after `settle_s`, so that the router's status polls have caught up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from loadtest.arrivals import Load, arrival_times
from loadtest.cluster_figures import figures, scrape
from loadtest.records import CANCELLED, ERROR, RequestRecord
from loadtest.request import Request
from loadtest.targets.base import Finished, Target, TargetError, Tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bounds:
    """Every run point stops at `duration_s` or after `max_requests`, whichever comes first."""

    duration_s: float
    max_requests: int

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration: must be > 0, got {self.duration_s}")
        if self.max_requests < 1:
            raise ValueError(f"max_requests: must be >= 1, got {self.max_requests}")


@dataclass
class PointResult:
    """One load point: its records, its measured length, the cluster's figures."""

    load: Load
    records: list[RequestRecord]
    duration_s: float
    cluster: dict[str, Any] = field(default_factory=dict)


class _Point:
    """The state of one running point."""

    def __init__(self, target: Target, id_prefix: str, progress: bool, total: int,
                 label: str) -> None:
        self.target = target
        self.id_prefix = id_prefix
        self.records: list[RequestRecord] = []
        self.bar = tqdm(total=total, desc=label, unit="req", disable=not progress,
                        dynamic_ncols=True)
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def send(self, request: Request, scheduled_s: float) -> None:
        record = RequestRecord(f"{self.id_prefix}-{request.index}", request.index,
                               request.group, scheduled_s, self.now(), request.input_len,
                               request.max_tokens)
        self.records.append(record)
        try:
            async for event in self.target.stream(request, record.request_id):
                if isinstance(event, Tokens):
                    record.chunk_times.append(self.now())
                    record.chunk_tokens.append(event.count)
                elif isinstance(event, Finished):
                    record.finish_reason = event.finish_reason
                    record.prompt_tokens = event.prompt_tokens
                    record.cached_tokens = event.cached_tokens
                    record.completion_tokens = event.completion_tokens
        except TargetError as error:
            record.outcome, record.error_code, record.error = ERROR, error.code, error.message
        except asyncio.CancelledError:
            record.outcome = CANCELLED
            raise
        except Exception as error:  # a harness or client failure: recorded, the run goes on
            log.exception("request %s failed in the client", record.request_id)
            record.outcome, record.error_code = ERROR, f"CLIENT_{type(error).__name__}"
            record.error = str(error)
        finally:
            record.end_s = self.now()
            self.bar.update(1)


async def _finish_by(deadline_s: float, point: _Point, tasks: set[asyncio.Task[None]]) -> None:
    """Waits for `tasks` until the deadline, then cancels what is left and waits for it."""
    pending = {t for t in tasks if not t.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(deadline_s - point.now(), 0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _open_loop(point: _Point, requests: Sequence[Request], offsets: Sequence[float],
                     duration_s: float) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def issue() -> None:
        for request, offset in zip(requests, offsets, strict=True):
            if offset >= duration_s:
                return
            await asyncio.sleep(max(offset - point.now(), 0))
            tasks.add(asyncio.create_task(point.send(request, offset)))

    issuer = asyncio.create_task(issue())
    await _finish_by(duration_s, point, {issuer})
    await _finish_by(duration_s, point, tasks)


async def _closed_loop(point: _Point, requests: Sequence[Request], concurrency: int,
                       duration_s: float) -> None:
    queue = iter(requests)

    async def user() -> None:
        while point.now() < duration_s and (request := next(queue, None)) is not None:
            await point.send(request, point.now())

    users = {asyncio.create_task(user()) for _ in range(concurrency)}
    await _finish_by(duration_s, point, users)


async def run_point(target: Target, requests: Sequence[Request], load: Load, bounds: Bounds,
                    seed: int, id_prefix: str, metrics_url: str | None = None,
                    progress: bool = True, settle_s: float = 1.0,
                    metrics_ca: str | None = None) -> PointResult:
    """Sends `requests` (the first `bounds.max_requests`) under `load`; returns the records
    (`metrics_ca`: the CA of an https `metrics_url`)."""
    requests = list(requests[:bounds.max_requests])
    status_before = await _status(target)
    metrics_before = await _scrape(metrics_url, metrics_ca)
    point = _Point(target, id_prefix, progress, len(requests), load.label)
    try:
        if load.concurrency is not None:
            await _closed_loop(point, requests, load.concurrency, bounds.duration_s)
        else:
            offsets = ([(r.arrival_s or 0.0) / load.speedup for r in requests]
                       if load.arrival == "trace"
                       else [float(t) for t in arrival_times(load, len(requests), seed)])
            await _open_loop(point, requests, offsets, bounds.duration_s)
    finally:
        point.bar.close()
    duration = point.now()
    if status_before is not None or metrics_url:
        await asyncio.sleep(settle_s)
    status_after = await _status(target) if status_before is not None else None
    metrics_after = (await _scrape(metrics_url, metrics_ca) if metrics_before is not None
                     else None)
    cluster = figures(status_before, status_after, metrics_before, metrics_after)
    records = sorted(point.records, key=lambda r: r.index)
    return PointResult(load, records, duration, cluster)


async def _status(target: Target) -> dict[str, Any] | None:
    try:
        return await target.cluster_status()
    except Exception as error:  # the run goes on without the cluster's figures
        log.warning("cannot read the cluster's status: %s", error)
        return None


async def _scrape(url: str | None, ca: str | None) -> dict[str, float] | None:
    if url is None:
        return None
    try:
        return await scrape(url, ca=ca)
    except Exception as error:  # the run goes on without the metrics
        log.warning("cannot read %s: %s", url, error)
        return None
