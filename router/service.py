"""The public `tandem.v1.Router` gRPC servicer: protobuf at the edge, `Router` inside."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext

from grpc import aio

from cluster.convert import FINISH_TO_PB, sampling_from_pb
from observability.metrics import LOCAL_PREFILL_REASONS, MIGRATION_REASONS
from observability.tracing import annotate, set_request_id
from router.prefix import IndexMode, TailSource
from router.request import Delta, GenerateInput
from router.router import Router
from router.text_log import RequestTextLog
from router.token_streams import TokenStreams
from router.validate import check_request_id
from tandem_proto.tandem.v1 import common_pb2, router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router, streams: TokenStreams | None = None,
                 ) -> None:
        self.router = router
        self.streams = streams  # with API tokens: generations per token
        self.text_log = RequestTextLog(router.config.log_request_text)

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateResponse]:
        request_id = request.request_id if request.HasField("request_id") else uuid.uuid4().hex
        check_request_id(request_id)  # before the id reaches a log line or a span
        annotate({"tandem.request_id": request_id})
        with set_request_id(request_id), self._stream_slot(context):
            sampling = sampling_from_pb(request.sampling, self.router.config.default_max_tokens)
            generate = GenerateInput(
                request_id=request_id, text=request.text, token_ids=list(request.token_ids),
                sampling=sampling, stop=list(request.sampling.stop),
                cache_salt=request.cache_salt if request.HasField("cache_salt") else "")
            self.text_log.prompt(generate)
            output = self.text_log.output(request_id)
            async for delta in self.router.generate(generate):
                output.add(delta.text)
                yield to_pb(request_id, delta)
            output.done()

    def _stream_slot(self, context: aio.ServicerContext) -> AbstractContextManager[None]:
        """One of the caller's token's stream slots (none to take without API tokens)."""
        if self.streams is None:
            return nullcontext()
        metadata = context.invocation_metadata() or ()
        authorization = next((v for k, v in metadata if k == "authorization"), None)
        return self.streams.stream(authorization if isinstance(authorization, str) else None)

    async def GetClusterStatus(self, request: router_pb2.GetClusterStatusRequest,
                               context: aio.ServicerContext,
                               ) -> router_pb2.GetClusterStatusResponse:
        router = self.router
        pool = router.pool
        stats = router.stats
        counters: dict[str, float] = {
            "requests": stats.requests, "retries": stats.retries,
            "inflight": router.admission.inflight, "queued": router.admission.waiting,
            "rejected": router.admission.rejected,
            "degraded_lookups": router.lookup.degraded_lookups,
            "index_mode_transitions": router.lookup.transitions,
            "pair_breaks": router.pair_health.breaks,
            **{f"decisions/{k}": v for k, v in stats.decisions.items()},
            **{f"outcome/{k}": v for k, v in stats.outcomes.items()},
            # every reason, zeros included: a load generator reads them before and after a run
            **{f"local_prefills/{k}": stats.local_prefills[k] for k in LOCAL_PREFILL_REASONS},
            "migrations": sum(stats.migrations.values()),
            **{f"migrations/{k}": stats.migrations[k] for k in MIGRATION_REASONS},
            **{f"stale_index_routes/{role}": stats.stale_index_routes[role]
               for role in ("prefill", "decode")},
            **(router.lookup.reader.counters()
               if isinstance(router.lookup.reader, TailSource) else {}),
        }
        return router_pb2.GetClusterStatusResponse(
            workers=[h.status for h in pool.workers.values() if h.status is not None and h.up],
            prefix_index_mode=(router_pb2.PREFIX_INDEX_MODE_EXACT
                               if router.lookup.mode is IndexMode.EXACT
                               else router_pb2.PREFIX_INDEX_MODE_DEGRADED),
            prefix_index_detail=router.lookup.detail,
            pair_errors=[router_pb2.PairError(prefill_worker_id=p, decode_worker_id=d,
                                              message=why)
                         for (p, d), why in router.excluded_pairs().items()],
            policy=router.policy.name, worker_errors=pool.config_errors(), counters=counters,
            discovery_problem=pool.registry.problem)


def to_pb(request_id: str, delta: Delta) -> router_pb2.GenerateResponse:
    response = router_pb2.GenerateResponse(request_id=request_id, token_ids=delta.token_ids,
                                           text=delta.text, finish_detail=delta.stop_string)
    if delta.finish_reason is not None:
        response.finish_reason = FINISH_TO_PB[delta.finish_reason]
    if delta.usage is not None:
        response.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=delta.usage.prompt_tokens, cached_tokens=delta.usage.cached_tokens,
            completion_tokens=delta.usage.completion_tokens))
    return response
