"""`python -m prefill_worker --model DIR ...` (also `tandem prefill ...`): one prefill worker."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.grpc_server import ServiceBinding
from cluster.roles import Role
from cluster.worker_config import WorkerConfig
from cluster.worker_main import run_worker, serve_role
from cluster.worker_runtime import WorkerRuntime
from prefill_worker.service import PrefillServicer
from prefill_worker.worker import PrefillWorker
from tandem_proto.tandem.v1 import prefill_pb2_grpc


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
    await serve_role(runtime, ServiceBinding(
        "tandem.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server,
        PrefillServicer(worker, config.cluster_secret())), worker)


def main(argv: Sequence[str] | None = None) -> None:
    run_worker(Role.PREFILL, serve, argv, __doc__)


if __name__ == "__main__":
    main()
