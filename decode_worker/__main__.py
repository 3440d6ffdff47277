"""`python -m decode_worker --model DIR ...` (also `tandem decode ...`): one decode worker."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.grpc_server import ServiceBinding
from cluster.roles import Role
from cluster.worker_config import WorkerConfig
from cluster.worker_main import run_worker, serve_role
from cluster.worker_runtime import WorkerRuntime
from decode_worker.service import DecodeServicer
from decode_worker.worker import DecodeWorker
from tandem_proto.tandem.v1 import decode_pb2_grpc


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
        await serve_role(runtime, ServiceBinding(
            "tandem.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server,
            DecodeServicer(worker, runtime)), worker)
    finally:
        await worker.stop()


def main(argv: Sequence[str] | None = None) -> None:
    run_worker(Role.DECODE, serve, argv, __doc__)


if __name__ == "__main__":
    main()
