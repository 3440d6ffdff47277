"""The `tandem.v1.Worker` servicer every worker serves: its status, and cancelling a request.

The role's worker object (prefill or decode) supplies what differs, through `RoleWorker`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from grpc import aio

from cluster.roles import Role
from cluster.worker_pb import worker_status
from cluster.worker_runtime import WorkerRuntime
from observability.tracing import annotate, set_request_id
from tandem_proto.tandem.v1 import common_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class RoleWorker(Protocol):
    """What a role (prefill or decode) tells the Worker service."""

    async def cancel(self, request_id: str, reason: str) -> bool:
        """Drops whatever is held for `request_id`; False when nothing was."""
        ...

    def counters(self) -> Mapping[str, float]:
        """The role's counters since start (they only grow)."""
        ...

    def gauges(self) -> Mapping[str, float]:
        """The role's current values."""
        ...


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, role: Role, worker: RoleWorker, runtime: WorkerRuntime) -> None:
        self.role = role
        self.worker = worker
        self.runtime = runtime

    async def Status(self, request: common_pb2.StatusRequest,
                     context: aio.ServicerContext) -> common_pb2.WorkerStatus:
        return worker_status(self.runtime, self.role, self.worker.counters(),
                             self.worker.gauges())

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: aio.ServicerContext) -> common_pb2.CancelResponse:
        annotate({"tandem.request_id": request.request_id})
        with set_request_id(request.request_id):
            found = await self.worker.cancel(request.request_id, request.reason or "cancelled")
        return common_pb2.CancelResponse(found=found)
