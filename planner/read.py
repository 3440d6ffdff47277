"""Reading the router's load figures: its cluster status over gRPC (the live workers' loads)
and, when configured, its Prometheus /metrics (the TTFT histogram, for the mean TTFT between
two readings)."""

from __future__ import annotations

import asyncio
import ssl
import urllib.request

from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from cluster.tls import client_channel, client_ssl_context
from planner.config import PlannerConfig
from planner.figures import LoadFigures, figures_from_status
from tandem_proto.tandem.v1 import router_pb2, router_pb2_grpc

TTFT_METRIC = "tandem_time_to_first_token_seconds"  # observability.metrics.RouterMetrics.ttft


class RouterReader:
    """One reading per `read()`; `close()` ends the channel."""

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._channel: aio.Channel = client_channel(config.router, config.tls_ca)
        context = client_ssl_context(config.tls_ca)
        self._ssl = context if isinstance(context, ssl.SSLContext) else None
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = ((("authorization", f"Bearer {config.api_token}"),)
                          if config.api_token else None)
        self._last_ttft: tuple[float, float] | None = None  # (sum, count) at the last reading

    async def read(self) -> LoadFigures:
        """Raises grpc.aio.AioRpcError when the router does not answer, OSError when its
        /metrics does not."""
        status = await self._stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(),
                                                   timeout=self.config.status_timeout_s,
                                                   metadata=self._metadata)
        ttft = await self._ttft() if self.config.router_metrics_url else None
        return figures_from_status(status, ttft)

    async def _ttft(self) -> float | None:
        assert self.config.router_metrics_url is not None
        text = await asyncio.to_thread(_fetch, self.config.router_metrics_url,
                                       self.config.status_timeout_s, self._ssl)
        totals = ttft_totals(text)
        last, self._last_ttft = self._last_ttft, totals
        if last is None or totals[1] <= last[1]:
            return None  # the first reading, or no first token since the last one
        return (totals[0] - last[0]) / (totals[1] - last[1])

    async def close(self) -> None:
        await self._channel.close()


def ttft_totals(text: str) -> tuple[float, float]:
    """(sum, count) of the router's TTFT histogram in a /metrics text."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != TTFT_METRIC:
            continue
        for sample in family.samples:
            if sample.name == TTFT_METRIC + "_sum":
                total = sample.value
            elif sample.name == TTFT_METRIC + "_count":
                count = sample.value
    return total, count


def _fetch(url: str, timeout_s: float, context: ssl.SSLContext | None) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
        return str(response.read().decode("utf-8"))
