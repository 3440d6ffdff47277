"""The `tandem.v1.Prefill` gRPC servicer: protobuf in, `PrefillWorker` calls, protobuf out."""

from __future__ import annotations

import time

from grpc import aio

from cluster import transfer_grant
from cluster.convert import sampling_from_pb
from cluster.errors import InvalidRequest
from observability.tracing import annotate, set_request_id
from prefill_worker.worker import PrefillWorker
from tandem_proto.tandem.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, cluster_secret: str) -> None:
        self.worker = worker
        self._secret = cluster_secret  # checks the decode workers' transfer grants

    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        annotate({"tandem.request_id": request.request_id,
                  "tandem.prefill": self.worker.worker_id})
        with set_request_id(request.request_id):
            target = request.target
            self._check_grant(request.request_id, target)
            result = await self.worker.prefill(
                request.request_id, list(request.token_ids), sampling_from_pb(request.sampling),
                target.endpoint.metadata.decode(), list(target.block_ids),
                target.num_cached_blocks,
                cache_salt=request.cache_salt.encode() if request.HasField("cache_salt") else b"")
        return prefill_pb2.PrefillResponse(
            first_token_id=result.first_token, num_computed_tokens=result.num_computed_tokens,
            num_cached_tokens=result.num_cached_tokens, num_blocks_sent=result.num_blocks_sent)

    def _check_grant(self, request_id: str, target: prefill_pb2.DecodeTarget) -> None:
        """Before anything is computed or written: the target must be what a decode worker
        reserved for this request, its lease not ended (`Forbidden` otherwise)."""
        try:
            metadata = target.endpoint.metadata.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("target.endpoint.metadata", "not UTF-8") from None
        transfer_grant.verify(self._secret, transfer_grant.target_of(
            request_id, target.endpoint.worker_id, metadata, target.endpoint.compat_hash,
            target.block_ids, target.num_cached_blocks, target.grant.expires_unix_ms),
            target.grant.mac, int(time.time() * 1000))
