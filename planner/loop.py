"""The planner's loop: read, decide, apply, every `interval_s`. A reading that fails (the
router or the API unreachable, RBAC) is logged and skipped: nothing changes on a reading the
planner does not have."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from kubernetes.aio.client.exceptions import ApiException

from planner.config import PLANNED_ROLES, PlannerConfig
from planner.decide import Plan, PlannerState, decide
from planner.read import RouterReader
from planner.scale import DeploymentScaler

log = logging.getLogger(__name__)


class Planner:
    """`await step()` once; `await run()` forever."""

    def __init__(self, config: PlannerConfig, reader: RouterReader,
                 scaler: DeploymentScaler) -> None:
        self.config = config
        self.reader = reader
        self.scaler = scaler
        self.state = PlannerState()
        self.failures = 0  # readings or patches that failed

    async def step(self, now_s: float | None = None) -> Plan | None:
        """One reading and what it led to; None when the reading failed."""
        try:
            figures = await self.reader.read()
            replicas = {role: await self.scaler.replicas(role) for role in PLANNED_ROLES}
        except (grpc.aio.AioRpcError, ApiException, OSError) as error:
            self.failures += 1
            log.warning("planner: no reading, nothing changes: %s", _short(error))
            return None
        plan = decide(self.config, self.state, figures, replicas,
                      time.monotonic() if now_s is None else now_s)
        self.state = plan.state
        for decision in plan.decisions:
            verb = "would set" if self.config.dry_run else "sets"
            if not decision.changes:
                log.info("planner: %s held at %d: %s", decision.role.value, decision.current,
                         decision.reason)
                continue
            log.info("planner %s %s %s → %d replicas: %s", verb,
                     self.config.deployment(decision.role), decision.role.value,
                     decision.target, decision.reason)
            if self.config.dry_run:
                continue
            try:
                await self.scaler.set_replicas(decision.role, decision.target)
            except ApiException as error:
                self.failures += 1
                log.error("planner: scaling %s failed (the planner needs get and patch on "
                          "deployments/scale): %s", self.config.deployment(decision.role),
                          _short(error))
        return plan

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.config.interval_s)


def _short(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name} {error.details()}"
    return f"{type(error).__name__}: {error}"
