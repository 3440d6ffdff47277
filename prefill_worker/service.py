"""The `tandem.v1.Prefill` gRPC servicer: protobuf in, `PrefillWorker` calls, protobuf out."""

from __future__ import annotations

from grpc import aio

from cluster.convert import sampling_from_pb
from cluster.roles import Role
from cluster.worker_pb import transfer_endpoint, worker_status
from cluster.worker_runtime import WorkerRuntime
from observability.tracing import server_span, set_request_id
from prefill_worker.worker import PrefillWorker
from tandem_proto.tandem.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, runtime: WorkerRuntime) -> None:
        self.worker = worker
        self.runtime = runtime

    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        with server_span("tandem.v1.Prefill/Prefill", context,
                         traceparent=request.trace.traceparent,
                         attributes={"tandem.request_id": request.request_id,
                                     "tandem.prefill": self.worker.worker_id}), \
                set_request_id(request.request_id):
            sampling = sampling_from_pb(request.sampling)
            target = request.target
            result = await self.worker.prefill(
                request.request_id, list(request.token_ids), sampling,
                target.endpoint.metadata.decode(), list(target.block_ids),
                target.num_cached_blocks)
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token, num_computed_tokens=result.num_computed_tokens,
            num_cached_tokens=result.num_cached_tokens, num_blocks_sent=result.num_blocks_sent)

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: aio.ServicerContext) -> common_pb2.CancelResponse:
        return common_pb2.CancelResponse(found=await self.worker.cancel(request.request_id))

    async def Status(self, request: common_pb2.StatusRequest,
                     context: aio.ServicerContext) -> common_pb2.WorkerStatus:
        stats = self.worker.stats
        return worker_status(self.runtime, Role.PREFILL, {
            "prefill_requests": stats.requests, "kv_blocks_sent": stats.blocks_sent,
            "transfer_failures": stats.transfer_failures,
            "kv_bytes_sent": self.runtime.agent.stats.bytes_sent})

    async def GetTransferInfo(self, request: common_pb2.GetTransferInfoRequest,
                              context: aio.ServicerContext) -> common_pb2.TransferEndpoint:
        return transfer_endpoint(self.runtime)
