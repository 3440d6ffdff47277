"""Any OpenAI-compatible server (vLLM, SGLang, Tandem's own front) over streaming HTTP.

`/v1/completions` gets the prompt as token ids (exact; OpenAI, vLLM and SGLang accept them),
`/v1/chat/completions` as one user message of the ids' decoded text. Every request asks for
the usage chunk (`stream_options.include_usage`) and, unless told not to, `ignore_eos` (a vLLM
and SGLang extension) so that output lengths are the ones asked. One kept `httpx.AsyncClient`
serves the whole run; a chunk with text is one token arrival. Without a model name, the first
one `GET /v1/models` lists is used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from cluster.tls import client_ssl_context
from loadtest.request import Request
from loadtest.targets.base import Finished, TargetError, Tokens
from loadtest.targets.sse import SSEDecoder, parse_chunk
from loadtest.tokens import TokenSpace

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class OpenAITarget:
    """`base_url` like `http://127.0.0.1:8000`; `endpoint` is "completions" or "chat";
    `model` None: the server's first."""

    name = "openai-http"

    def __init__(self, base_url: str, model: str | None, endpoint: str = "completions",
                 space: TokenSpace | None = None, ignore_eos: bool = True,
                 api_key: str | None = None, max_connections: int = 1024,
                 timeout_s: float | None = None, ca: str | None = None) -> None:
        """`ca`: the CA file that signed an https server's certificate (None: the system's
        CAs)."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint: must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if endpoint == "chat" and (space is None or space.tokenizer is None):
            raise ValueError("endpoint: chat sends text, which needs --tokenizer DIR")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + ENDPOINTS[endpoint]
        self.model = model
        self.endpoint = endpoint
        self.space = space
        self.ignore_eos = ignore_eos
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.limits = httpx.Limits(max_connections=max_connections,
                                   max_keepalive_connections=max_connections)
        self.timeout = httpx.Timeout(timeout_s)
        self.verify = client_ssl_context(ca)
        self.client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> OpenAITarget:
        self.client = httpx.AsyncClient(limits=self.limits, timeout=self.timeout,
                                        headers=self.headers, verify=self.verify)
        if self.model is None:
            response = await self.client.get(self.base_url + "/v1/models")
            response.raise_for_status()
            models = response.json().get("data") or []
            if not models:
                raise ValueError(f"model: {self.base_url}/v1/models lists none; give --model")
            self.model = str(models[0]["id"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.aclose()

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body of one request."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                "stream": True, "stream_options": {"include_usage": True},
                                "temperature": 0.0}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            assert self.space is not None
            body["messages"] = [{"role": "user", "content": self.space.decode(request.token_ids)}]
        else:
            body["prompt"] = list(request.token_ids)
        return body

    async def stream(self, request: Request,
                     request_id: str) -> AsyncIterator[Tokens | Finished]:
        assert self.client is not None, "use the target as `async with`"
        decoder = SSEDecoder()
        finish: str | None = None
        usage: dict[str, int | None] = {}
        try:
            async with self.client.stream("POST", self.url, json=self.body(request),
                                          headers={"X-Request-Id": request_id}) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise TargetError(str(response.status_code), detail)
                async for data in response.aiter_bytes():
                    for event in decoder.feed(data):
                        delta = parse_chunk(event)
                        if delta.done:
                            break
                        if delta.text:
                            yield Tokens(1)
                        finish = delta.finish_reason or finish
                        if delta.completion_tokens is not None:
                            usage = {"prompt_tokens": delta.prompt_tokens,
                                     "cached_tokens": delta.cached_tokens,
                                     "completion_tokens": delta.completion_tokens}
        except httpx.HTTPError as error:
            raise TargetError(type(error).__name__, str(error)) from None
        if finish is None:
            raise TargetError("INCOMPLETE", "the stream ended without a finish reason")
        yield Finished(finish, **usage)

    async def cluster_status(self) -> dict[str, Any] | None:
        return None
