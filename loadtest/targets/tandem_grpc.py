"""The Tandem router over gRPC: prompts sent as `token_ids` (exact), output made exact with
`ignore_eos`, and the cluster's counters from `GetClusterStatus`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cli.router_client import RouterClient
from loadtest.request import Request
from loadtest.targets.base import Finished, TargetError, Tokens
from tandem_proto.tandem.v1 import common_pb2

ROLES = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode",
         common_pb2.WORKER_ROLE_AGGREGATED: "aggregated"}


class TandemTarget:
    """`address` is the router's host:port. `cache_salt`, when set, goes with every request,
    so that this run shares no prefix-cache blocks with an earlier one."""

    name = "tandem-grpc"

    def __init__(self, address: str, cache_salt: str | None = None,
                 timeout_s: float | None = None, ca: str | None = None) -> None:
        """`ca`: the CA file of the router's certificate (TLS); None: plaintext."""
        self.address = address
        self.ca = ca
        self.cache_salt = cache_salt
        self.timeout_s = timeout_s
        self.client: RouterClient | None = None

    async def __aenter__(self) -> TandemTarget:
        self.client = RouterClient(self.address, ca=self.ca)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.close()

    async def stream(self, request: Request,
                     request_id: str) -> AsyncIterator[Tokens | Finished]:
        assert self.client is not None, "use the target as `async with`"
        try:
            async for chunk in self.client.generate(
                    token_ids=request.token_ids, max_tokens=request.max_tokens,
                    ignore_eos=True, request_id=request_id, cache_salt=self.cache_salt,
                    timeout=self.timeout_s):
                if chunk.token_ids:
                    yield Tokens(len(chunk.token_ids))
                if chunk.finish_reason is not None:
                    yield Finished(chunk.finish_reason, chunk.prompt_tokens,
                                   chunk.cached_tokens, chunk.completion_tokens)
                    return
        except grpc.aio.AioRpcError as error:
            raise TargetError(error.code().name, error.details() or "") from None
        raise TargetError("INCOMPLETE", "the stream ended without a finish reason")

    async def cluster_status(self) -> dict[str, Any] | None:
        assert self.client is not None, "use the target as `async with`"
        status = await self.client.status()
        return {
            "policy": status.policy,
            "router": dict(status.counters),
            "workers": {w.worker_id: {"role": ROLES.get(w.role, "unknown"),
                                      "counters": dict(w.counters)} for w in status.workers},
        }
