"""The `tandem.v1.Prefill` gRPC servicer: protobuf in, `PrefillWorker` calls, protobuf out."""

from __future__ import annotations

from grpc import aio

from cluster.convert import sampling_from_pb
from observability.tracing import annotate, set_request_id
from prefill_worker.worker import PrefillWorker
from tandem_proto.tandem.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        annotate({"tandem.request_id": request.request_id,
                  "tandem.prefill": self.worker.worker_id})
        with set_request_id(request.request_id):
            target = request.target
            result = await self.worker.prefill(
                request.request_id, list(request.token_ids), sampling_from_pb(request.sampling),
                target.endpoint.metadata.decode(), list(target.block_ids),
                target.num_cached_blocks,
                cache_salt=request.cache_salt.encode() if request.HasField("cache_salt") else b"")
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token, num_computed_tokens=result.num_computed_tokens,
            num_cached_tokens=result.num_cached_tokens, num_blocks_sent=result.num_blocks_sent)
