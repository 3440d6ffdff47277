"""The `tandem.v1.Decode` gRPC servicer: protobuf in, `DecodeWorker` calls, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from grpc import aio

from cluster import transfer_grant
from cluster.convert import FINISH_TO_PB, sampling_from_pb
from cluster.roles import Role
from cluster.worker_pb import transfer_endpoint
from cluster.worker_runtime import WorkerRuntime
from decode_worker.worker import DecodeWorker
from observability.tracing import annotate, set_request_id
from tandem_proto.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, runtime: WorkerRuntime) -> None:
        self.worker = worker
        self.runtime = runtime
        self._secret = runtime.config.cluster_secret()  # signs the transfer grants

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
        expires_ms = int((time.time() + lease_left_s) * 1000)
        endpoint = transfer_endpoint(self.runtime)
        num_cached_blocks = reservation.num_cached_tokens // block_size
        return decode_pb2.ReserveResponse(
            block_ids=reservation.block_ids,
            num_cached_blocks=num_cached_blocks,
            num_cached_tokens=reservation.num_cached_tokens,
            endpoint=endpoint, lease_expires_unix_ms=expires_ms,
            grant=self._grant(request.request_id, endpoint, reservation.block_ids,
                              num_cached_blocks, expires_ms))

    def _grant(self, request_id: str, endpoint: common_pb2.TransferEndpoint,
               block_ids: list[int], num_cached_blocks: int,
               expires_ms: int) -> common_pb2.TransferGrant:
        """Permission to write `block_ids` here for `request_id` until the lease ends; an
        aggregated worker signs as such, so no prefill worker writes into it."""
        role = transfer_grant.SIGNER_ROLE if self.runtime.config.role is Role.DECODE else \
            self.runtime.config.role.value
        target = transfer_grant.target_of(request_id, endpoint.worker_id,
                                          endpoint.metadata.decode(), endpoint.compat_hash,
                                          block_ids, num_cached_blocks, expires_ms)
        return common_pb2.TransferGrant(expires_unix_ms=expires_ms,
                                        mac=transfer_grant.sign(self._secret, target, role))

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
