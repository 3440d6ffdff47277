"""`python -m decode_worker --model DIR ...` (also `tandem decode ...`): one decode worker."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cluster.grpc_server import ServiceBinding
from cluster.roles import Role
from cluster.worker_config import WorkerConfig, worker_flags
from cluster.worker_runtime import WorkerRuntime
from cluster.worker_service import WorkerServicer
from decode_worker.service import DecodeServicer
from decode_worker.worker import DecodeWorker
from observability.logging_setup import setup_logging
from observability.tracing import setup_tracing
from tandem_proto.tandem.v1 import decode_pb2_grpc, worker_pb2_grpc


async def serve(config: WorkerConfig) -> None:
    runtime = WorkerRuntime(config)
    loop = runtime.start_engine()
    worker = DecodeWorker(loop, runtime.agent, runtime.worker_id, config.lease_ms / 1000,
                          quarantine_s=config.quarantine_s,
                          lease_check_interval_s=config.lease_check_interval_s)
    runtime.on_transfer_events(worker.on_transfer_events)
    runtime.attach_metrics(decode=lambda: worker.stats)
    worker.start()
    try:
        await runtime.serve([
            ServiceBinding("tandem.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server,
                           DecodeServicer(worker, runtime)),
            ServiceBinding("tandem.v1.Worker", worker_pb2_grpc.add_WorkerServicer_to_server,
                           WorkerServicer(Role.DECODE, worker, runtime))])
    finally:
        await worker.stop()
    if loop.fatal is not None:
        sys.exit(f"decode worker {runtime.worker_id}: engine failed: {loop.fatal!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tandem decode", description=__doc__)
    flags = worker_flags()
    flags.add_to(parser)
    config = flags.parse(parser, argv, role=Role.DECODE)
    setup_logging()
    setup_tracing("tandem-decode")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
