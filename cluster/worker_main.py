"""What both worker roles' entry points share: flags to config, logging and tracing, and serving
the role's service beside the `Worker` service until stopped.

    def main(argv=None):
        run_worker(Role.DECODE, serve, argv, __doc__)      # decode_worker/__main__.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cluster.grpc_server import ServiceBinding
from cluster.roles import Role
from cluster.worker_config import WorkerConfig, worker_flags
from cluster.worker_runtime import WorkerRuntime
from cluster.worker_service import RoleWorker, WorkerServicer
from index.redis_client import RedisAuthFailed
from observability.logging_setup import setup_logging
from observability.tracing import setup_tracing
from tandem_proto.tandem.v1 import worker_pb2_grpc


async def serve_role(runtime: WorkerRuntime, service: ServiceBinding, worker: RoleWorker,
                     ) -> None:
    """Serves `service` and `tandem.v1.Worker` until stopped; a dead engine exits non-zero, so
    the supervisor (Kubernetes, `tandem up`) restarts the process."""
    role = runtime.config.role
    await runtime.serve([service, ServiceBinding(
        "tandem.v1.Worker", worker_pb2_grpc.add_WorkerServicer_to_server,
        WorkerServicer(role, worker, runtime))])
    if runtime.loop is not None and runtime.loop.fatal is not None:
        sys.exit(f"{role.value} worker {runtime.worker_id}: engine failed: "
                 f"{runtime.loop.fatal!r}")


def run_worker(role: Role, serve: Callable[[WorkerConfig], Coroutine[Any, Any, None]],
               argv: Sequence[str] | None, description: str | None) -> None:
    """`tandem <role> FLAGS`: parses the flags (and `TANDEM_*` variables) into the config and
    runs `serve(config)`."""
    parser = argparse.ArgumentParser(prog=f"tandem {role.value}", description=description)
    flags = worker_flags()
    flags.add_to(parser)
    config = flags.parse(parser, argv, role=role)
    try:
        config.tls.require_choice()
    except ValueError as error:
        parser.error(str(error))
    setup_logging()
    setup_tracing(f"tandem-{role.value}")
    try:
        asyncio.run(serve(config))
    except RedisAuthFailed as error:  # a configuration error: say so, no traceback
        raise SystemExit(f"tandem {role.value}: {error}") from None
