"""The `tandem.v1.Decode` gRPC servicer: protobuf in, `DecodeWorker` calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from cluster.convert import sampling_from_pb
from cluster.roles import Role
from cluster.worker_pb import transfer_endpoint, worker_status
from cluster.worker_runtime import WorkerRuntime
from decode_worker.worker import DecodeWorker
from engine.request import FinishReason
from observability.tracing import server_span, set_request_id
from tandem_proto.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: common_pb2.FINISH_REASON_CANCELLED,
}


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, runtime: WorkerRuntime) -> None:
        self.worker = worker
        self.runtime = runtime

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        with server_span("tandem.v1.Decode/Reserve", context,
                         traceparent=request.trace.traceparent,
                         attributes={"tandem.request_id": request.request_id,
                                     "tandem.decode": self.worker.worker_id}) as reserve, \
                set_request_id(request.request_id):
            sampling = sampling_from_pb(request.sampling)
            lease_s = request.lease_ms / 1000 if request.lease_ms else None
            reservation = await self.worker.reserve(request.request_id, list(request.token_ids),
                                                    sampling, lease_s)
            reserve.set_attribute("tandem.cached_tokens", reservation.num_cached_tokens)
        block_size = self.runtime.engine.config.block_size
        return decode_pb2.ReserveResponse(
            block_ids=reservation.block_ids,
            num_cached_blocks=reservation.num_cached_tokens // block_size,
            num_cached_tokens=reservation.num_cached_tokens,
            endpoint=transfer_endpoint(self.runtime),
            lease_expires_unix_ms=0)

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        with server_span("tandem.v1.Decode/Decode", context,
                         traceparent=request.trace.traceparent,
                         attributes={"tandem.request_id": request.request_id,
                                     "tandem.decode": self.worker.worker_id}), \
                set_request_id(request.request_id):
            async for output in self.worker.decode(request.request_id, request.first_token_id):
                response = decode_pb2.DecodeResponse(token_ids=output.new_token_ids)
                if output.finished and output.finish_reason is not None:
                    response.finish_reason = FINISH_REASONS[output.finish_reason]
                yield response

    async def Release(self, request: common_pb2.CancelRequest,
                      context: aio.ServicerContext) -> common_pb2.CancelResponse:
        return common_pb2.CancelResponse(found=await self.worker.release(request.request_id))

    async def Status(self, request: common_pb2.StatusRequest,
                     context: aio.ServicerContext) -> common_pb2.WorkerStatus:
        stats = self.worker.stats
        return worker_status(self.runtime, Role.DECODE, {
            "reservations": stats.reservations, "lease_expiries": stats.lease_expiries,
            "local_prefills": stats.local_prefills,
            "transfers_completed": stats.transfers_completed,
            "transfers_failed": stats.transfers_failed,
            "cached_prompt_tokens": stats.cached_prompt_tokens,
            "kv_bytes_received": self.runtime.agent.stats.bytes_received})

    async def GetTransferInfo(self, request: common_pb2.GetTransferInfoRequest,
                              context: aio.ServicerContext) -> common_pb2.TransferEndpoint:
        return transfer_endpoint(self.runtime)
