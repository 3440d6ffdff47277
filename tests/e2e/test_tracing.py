"""Tracing end to end: a real cluster exports over OTLP/gRPC to a receiver in the test.

Every request must yield exactly one trace with router, prefill, transfer and decode spans,
correctly parented across the three processes (the decode side's `kv.receive` is a child of
the prefill side's `kv.send`, through the KV transfer's notification).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, tree_problems

pytestmark = pytest.mark.timeout(300)

REQUIRED = {
    "tandem.v1.Router/Generate": "tandem-router",
    "router.route": "tandem-router",
    "tandem.v1.Prefill/Prefill": "tandem-prefill",
    "prefill.compute": "tandem-prefill",
    "kv.send": "tandem-prefill",
    "kv.receive": "tandem-decode",
    "tandem.v1.Decode/Reserve": "tandem-decode",
    "tandem.v1.Decode/Decode": "tandem-decode",
    "decode.admission": "tandem-decode",
    "decode.stream": "tandem-decode",
}


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", running.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        yield running


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans}


async def test_one_trace_per_request_across_processes(receiver: OtlpReceiver,
                                                      tiny_llama: Path, tmp_path: Path) -> None:
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=tmp_path,
                      worker_args=["--num-blocks", "64"]) as cluster:
        async with RouterClient(cluster.router_address) as client:
            ids = [f"traced-{i}" for i in range(3)]
            await asyncio.gather(*(client.complete(token_ids=list(range(5, 45 + i)),
                                                   max_tokens=4, ignore_eos=True, request_id=rid)
                                   for i, rid in enumerate(ids)))

        def complete(_spans: list[ReceivedSpan]) -> bool:
            traces = receiver.traces()
            return len(traces) >= 3 and all(
                {s.name for s in t} >= set(REQUIRED) for t in traces.values())
        await asyncio.to_thread(receiver.wait_for, complete, 30)
    traces = receiver.traces()
    assert len(traces) == 3
    seen_ids = set()
    for spans in traces.values():
        assert tree_problems(spans) == []
        named = by_name(spans)
        for name, service in REQUIRED.items():
            assert named[name].service_name == service, name
        root = named["tandem.v1.Router/Generate"]
        assert root.parent_span_id == ""
        seen_ids.add(root.attributes["tandem.request_id"])
        assert named["kv.receive"].parent_span_id == named["kv.send"].span_id
        assert named["kv.send"].attributes["tandem.kv.blocks"] >= 1
        assert named["tandem.v1.Prefill/Prefill"].parent_span_id == \
            next(s.span_id for s in spans if s.name == "tandem.v1.Prefill/Prefill"
                 and s.service_name == "tandem-router")
        assert named["router.route"].attributes["tandem.policy"] == "kv_aware"
    assert seen_ids == {f"traced-{i}" for i in range(3)}
