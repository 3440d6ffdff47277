"""`python -m prefill_worker --model DIR ...` (also `tandem prefill ...`): one prefill worker."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cluster.grpc_server import ServiceBinding
from cluster.roles import Role
from cluster.worker_config import WorkerConfig, worker_flags
from cluster.worker_runtime import WorkerRuntime
from cluster.worker_service import WorkerServicer
from observability.logging_setup import setup_logging
from observability.tracing import setup_tracing
from prefill_worker.service import PrefillServicer
from prefill_worker.worker import PrefillWorker
from tandem_proto.tandem.v1 import prefill_pb2_grpc, worker_pb2_grpc


async def serve(config: WorkerConfig) -> None:
    runtime = WorkerRuntime(config)
    worker: PrefillWorker | None = None

    def on_layer_done(layer: int, batch: object) -> None:
        assert worker is not None
        worker.on_layer_done(layer, batch)  # type: ignore[arg-type]

    loop = runtime.start_engine(on_layer_done)
    worker = PrefillWorker(loop, runtime.agent, runtime.worker_id,
                           transfer_timeout_s=config.transfer_timeout_s)
    runtime.on_transfer_events(worker.on_transfer_events)
    runtime.attach_metrics(prefill=lambda: worker.stats)
    await runtime.serve([
        ServiceBinding("tandem.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server,
                       PrefillServicer(worker)),
        ServiceBinding("tandem.v1.Worker", worker_pb2_grpc.add_WorkerServicer_to_server,
                       WorkerServicer(Role.PREFILL, worker, runtime))])
    if loop.fatal is not None:
        sys.exit(f"prefill worker {runtime.worker_id}: engine failed: {loop.fatal!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tandem prefill", description=__doc__)
    flags = worker_flags()
    flags.add_to(parser)
    config = flags.parse(parser, argv, role=Role.PREFILL)
    setup_logging()
    setup_tracing("tandem-prefill")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
