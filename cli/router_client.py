"""A small async client for the public `Router` service (CLI, tests, load harness).

    async with RouterClient("127.0.0.1:50051") as client:
        async for chunk in client.generate(text="Hello", max_tokens=16):
            print(chunk.text, end="")
        status = await client.status()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from grpc import aio

from cluster.convert import FINISH_FROM_PB
from cluster.grpc_auth import metadata_interceptors
from cluster.tls import client_channel
from tandem_proto.tandem.v1 import common_pb2, router_pb2, router_pb2_grpc


@dataclass
class Chunk:
    """One streamed message."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    """A whole generation, gathered from its chunks."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class RouterClient:
    """The router's public API; `token`: sent as `authorization: Bearer <token>` on every
    call (the router's `api_tokens_file`); `ca`: the CA file that signed the router's
    certificate (TLS; None: plaintext, for a router run with --insecure-plaintext)."""

    def __init__(self, address: str, token: str | None = None, ca: str | None = None,
                 server_name: str | None = None) -> None:
        self.address = address
        auth = metadata_interceptors([("authorization", f"Bearer {token}")]) if token else ()
        self.channel: aio.Channel = client_channel(address, ca, server_name=server_name,
                                                   interceptors=auth)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, text: str = "", token_ids: Sequence[int] = (), *,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                       request_id: str | None = None, cache_salt: str | None = None,
                       timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Streams a generation; raises `grpc.aio.AioRpcError` with the status on failure."""
        sampling = common_pb2.SamplingParams(stop=list(stop), stop_token_ids=list(stop_token_ids),
                                             ignore_eos=ignore_eos)
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                            ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
            if value is not None:
                setattr(sampling, name, value)
        request = router_pb2.GenerateRequest(text=text, token_ids=list(token_ids),
                                             sampling=sampling)
        if request_id is not None:
            request.request_id = request_id
        if cache_salt is not None:
            request.cache_salt = cache_salt
        async for message in self.stub.Generate(request, timeout=timeout):
            yield Chunk(message.request_id, list(message.token_ids), message.text,
                        FINISH_FROM_PB.get(message.finish_reason),
                        message.usage.prompt_tokens, message.usage.cached_tokens,
                        message.usage.completion_tokens)

    async def complete(self, text: str = "", token_ids: Sequence[int] = (),
                       **kwargs: object) -> Completion:
        """Runs a generation to the end and returns it whole."""
        result = Completion()
        async for chunk in self.generate(text, token_ids, **kwargs):  # type: ignore[arg-type]
            result.token_ids += chunk.token_ids
            result.text += chunk.text
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
                result.prompt_tokens = chunk.prompt_tokens
                result.cached_tokens = chunk.cached_tokens
                result.completion_tokens = chunk.completion_tokens
        return result

    async def status(self, timeout: float = 5.0) -> router_pb2.GetClusterStatusResponse:
        return await self.stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(),
                                                timeout=timeout)
