"""The `tandem.v1.Decode` gRPC servicer: protobuf in, `DecodeWorker` calls, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from grpc import aio

from cluster.convert import FINISH_TO_PB, sampling_from_pb
from cluster.worker_pb import transfer_endpoint
from cluster.worker_runtime import WorkerRuntime
from decode_worker.worker import DecodeWorker
from observability.tracing import annotate, set_request_id
from tandem_proto.tandem.v1 import decode_pb2, decode_pb2_grpc


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, runtime: WorkerRuntime) -> None:
        self.worker = worker
        self.runtime = runtime

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        annotate({"tandem.request_id": request.request_id,
                  "tandem.decode": self.worker.worker_id})
        with set_request_id(request.request_id):
            lease_s = request.lease_ms / 1000 if request.lease_ms else None
            reservation = await self.worker.reserve(
                request.request_id, list(request.token_ids), sampling_from_pb(request.sampling),
                lease_s,
                cache_salt=request.cache_salt.encode() if request.HasField("cache_salt") else b"")
        annotate({"tandem.cached_tokens": reservation.num_cached_tokens})
        block_size = self.runtime.engine.config.block_size
        lease_left_s = max(reservation.lease_deadline - time.monotonic(), 0.0)
        return decode_pb2.ReserveResponse(
            block_ids=reservation.block_ids,
            num_cached_blocks=reservation.num_cached_tokens // block_size,
            num_cached_tokens=reservation.num_cached_tokens,
            endpoint=transfer_endpoint(self.runtime),
            lease_expires_unix_ms=int((time.time() + lease_left_s) * 1000))

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        annotate({"tandem.request_id": request.request_id,
                  "tandem.decode": self.worker.worker_id})
        with set_request_id(request.request_id):
            first = request.first_token_id if request.HasField("first_token_id") else None
            async for output in self.worker.decode(request.request_id, first):
                response = decode_pb2.DecodeResponse(token_ids=output.new_token_ids)
                if output.finished and output.finish_reason is not None:
                    response.finish_reason = FINISH_TO_PB[output.finish_reason.value]
                yield response
