"""The load figures the planner decides on, and each role's utilization from them.

Utilization is a role's load against its capacity, 1.0 meaning full:

    prefill   max(queued prompt blocks / (workers × prefill_queue_blocks_target),
                  mean TTFT / ttft_target_s)                    (TTFT only when configured)
    decode    max(KV blocks used / KV blocks total,
                  (running + waiting requests) / the batch slots (max_running summed))

Prefill is compute-bound (its queue, and TTFT, grow when it lacks workers); decode is
memory-bound (KV blocks and batch slots fill up when it lacks workers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cluster.roles import Role
from planner.config import PLANNED_ROLES, PlannerConfig
from tandem_proto.tandem.v1 import common_pb2, router_pb2

_ROLES_PB = {common_pb2.WORKER_ROLE_PREFILL: Role.PREFILL,
             common_pb2.WORKER_ROLE_DECODE: Role.DECODE}


@dataclass(frozen=True)
class RoleFigures:
    """One role's load, summed over its live workers."""

    workers: int = 0
    running: int = 0
    waiting: int = 0
    max_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prompt_blocks: int = 0


@dataclass(frozen=True)
class LoadFigures:
    """One reading: per role, and the mean TTFT since the previous reading (None: unknown,
    or no request got its first token in between)."""

    roles: dict[Role, RoleFigures]
    ttft_s: float | None = None

    def role(self, role: Role) -> RoleFigures:
        return self.roles.get(role, RoleFigures())


def figures_from_status(status: router_pb2.GetClusterStatusResponse,
                        ttft_s: float | None = None) -> LoadFigures:
    """The figures of the router's cluster status (its live workers' last loads)."""
    return LoadFigures({role: _sum(w.load for w in status.workers if _ROLES_PB.get(w.role)
                                   is role) for role in PLANNED_ROLES}, ttft_s)


def _sum(loads: Iterable[common_pb2.WorkerLoad]) -> RoleFigures:
    loads = list(loads)
    return RoleFigures(workers=len(loads), running=sum(x.running for x in loads),
                       waiting=sum(x.waiting for x in loads),
                       max_running=sum(x.max_running for x in loads),
                       kv_blocks_used=sum(x.kv_blocks_used for x in loads),
                       kv_blocks_total=sum(x.kv_blocks_total for x in loads),
                       queued_prompt_blocks=sum(x.queued_prompt_blocks for x in loads))


def utilization(role: Role, figures: LoadFigures, config: PlannerConfig) -> float | None:
    """`role`'s utilization (see the module doc), or None when it has no live worker to
    measure (its pods are starting: no reading)."""
    f = figures.role(role)
    if f.workers == 0:
        return None
    if role is Role.PREFILL:
        signals = [f.queued_prompt_blocks / (f.workers * config.prefill_queue_blocks_target)]
        if config.ttft_target_s is not None and figures.ttft_s is not None:
            signals.append(figures.ttft_s / config.ttft_target_s)
    else:
        signals = [f.kv_blocks_used / f.kv_blocks_total if f.kv_blocks_total else 0.0,
                   (f.running + f.waiting) / f.max_running if f.max_running else 0.0]
    return max(signals)
