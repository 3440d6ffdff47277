"""`setup_tracing` for real, in separate Python processes exporting over OTLP/gRPC to a receiver
on loopback: one trace across two processes, the standard `OTEL_*` switches, bounded exit.

Each child is `python -c SCRIPT` run from the repository root; it exits normally, so the
atexit flush of `setup_tracing` has sent its spans before `run()` returns.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

ROOT = Path(__file__).resolve().parents[2]

SENDER = """
import logging, sys
from observability import tracing
from observability.logging_setup import setup_logging
setup_logging()
on = tracing.setup_tracing("proc-a", attributes={"service.instance.id": "a-1"})
with tracing.set_request_id("req-7"), \\
        tracing.span("a.request", kind=tracing.SpanKind.SERVER, attributes={"n": 1}):
    logging.getLogger("a").info("sending")
    with tracing.span("a.send", kind=tracing.SpanKind.PRODUCER):
        print("TP", tracing.current_traceparent(), flush=True)
print("ON", on, flush=True)
"""

RECEIVER = """
import logging, sys
from observability import tracing
from observability.logging_setup import setup_logging
setup_logging()
on = tracing.setup_tracing("proc-b")
carried = sys.argv[1]
with tracing.set_request_id("req-7.0"):
    tracing.record_span("b.receive", parent=carried, duration_s=0.01,
                        kind=tracing.SpanKind.CONSUMER, attributes={"tandem.kv.bytes": 4096})
    with tracing.span("b.admit", parent=carried):
        with tracing.span("b.child"):
            logging.getLogger("b").info("admitted")
print("ON", on, flush=True)
"""

ONE_SPAN = """
import sys
from observability import tracing
on = tracing.setup_tracing("fallback-name")
with tracing.span(sys.argv[1]):
    pass
print("ON", on, flush=True)
"""

SLOW_EXIT = """
import time
from observability import tracing
assert tracing.setup_tracing("slow")
with tracing.span("never-delivered"):
    pass
started = time.monotonic()
tracing.shutdown_tracing(timeout_s=1.0)
print("SHUTDOWN", round(time.monotonic() - started, 2), flush=True)
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


def child_env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
                "PYTHONPATH": str(ROOT), "TANDEM_LOG_LEVEL": "INFO"})
    env.update(extra)
    return env


def start(script: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"child failed ({process.returncode}):\n{out}\n{err}"
    return out, err


def test_one_trace_across_two_processes(receiver: OtlpReceiver) -> None:
    out_a, err_a = finish(start(SENDER, child_env(receiver.endpoint)))
    assert "ON True" in out_a
    carried = re.search(r"^TP (\S+)$", out_a, re.M)
    assert carried is not None, out_a
    out_b, err_b = finish(start(RECEIVER, child_env(receiver.endpoint), carried.group(1)))
    assert "ON True" in out_b

    spans = receiver.wait_for(lambda got: len(got) >= 5, timeout=10)
    assert len(spans) == 5, spans
    traces = receiver.traces()
    assert len(traces) == 1, traces
    (trace_id, _), = traces.items()
    by_name: dict[str, ReceivedSpan] = {s.name: s for s in spans}
    request, send = by_name["a.request"], by_name["a.send"]
    receive, admit, child = by_name["b.receive"], by_name["b.admit"], by_name["b.child"]
    assert request.parent_span_id == ""
    assert send.parent_span_id == request.span_id
    assert receive.parent_span_id == send.span_id  # across processes, via the string
    assert admit.parent_span_id == send.span_id
    assert child.parent_span_id == admit.span_id
    assert {s.service_name for s in (request, send)} == {"proc-a"}
    assert {s.service_name for s in (receive, admit, child)} == {"proc-b"}
    assert request.resource["service.instance.id"] == "a-1"
    assert (request.kind, send.kind, receive.kind) == ("SERVER", "PRODUCER", "CONSUMER")
    assert receive.attributes == {"tandem.kv.bytes": 4096}
    assert 9_000_000 <= receive.end_time_ns - receive.start_time_ns <= 11_000_000
    assert carried.group(1).split("-")[1:3] == [trace_id, send.span_id]
    # the real log format of both processes names the request and the trace
    assert re.search(rf"INFO .* a \[req=req-7 trace={trace_id}\]: sending", err_a), err_a
    assert re.search(rf"INFO .* b \[req=req-7.0 trace={trace_id}\]: admitted", err_b), err_b


def test_standard_variables_switch_off_sample_and_name(receiver: OtlpReceiver) -> None:
    endpoint = receiver.endpoint
    cases = {  # span name → extra environment
        "named-by-env": {"OTEL_SERVICE_NAME": "from-env",
                         "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"},
        "traces-endpoint-only": {"OTEL_EXPORTER_OTLP_ENDPOINT": "",
                                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint},
        "sampled-out": {"OTEL_TRACES_SAMPLER": "always_off"},
        "ratio-zero": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        "sdk-disabled": {"OTEL_SDK_DISABLED": "true"},
        "exporter-none": {"OTEL_TRACES_EXPORTER": "none"},
        "no-endpoint": {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    }
    children = {name: start(ONE_SPAN, child_env(endpoint, **extra), name)
                for name, extra in cases.items()}
    outputs = {name: finish(process)[0] for name, process in children.items()}
    on = {name for name, out in outputs.items() if "ON True" in out}
    assert on == {"named-by-env", "traces-endpoint-only", "sampled-out", "ratio-zero"}
    # every child has exited and flushed at exit: what will arrive has arrived
    received = {s.name: s for s in receiver.spans()}
    assert set(received) == {"named-by-env", "traces-endpoint-only"}
    assert received["named-by-env"].service_name == "from-env"
    assert received["named-by-env"].resource["deployment.environment"] == "test"
    assert received["traces-endpoint-only"].service_name == "fallback-name"


def test_exit_is_bounded_when_the_collector_is_unreachable() -> None:
    dead = OtlpReceiver()
    dead.stop()  # a port nobody listens on any more
    env = child_env(dead.endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="30")
    started = time.monotonic()
    out, _ = finish(start(SLOW_EXIT, env))
    took = float(re.search(r"SHUTDOWN (\S+)", out).group(1))  # type: ignore[union-attr]
    assert took < 2.5, out  # the exporter alone would retry for up to 30 s
    assert time.monotonic() - started < 15
