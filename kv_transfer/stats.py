"""Plain-Python transfer counters that the observability work exports (no prometheus here)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Upper bounds (seconds) of the latency histogram buckets, Prometheus-style (+Inf is implicit).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0)


@dataclass
class Histogram:
    """Cumulative-ready latency histogram: `counts[i]` observations fell in bucket `i`."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class TransferStats:
    """Bytes moved, latency and failures by reason, for one agent. Thread-safe updates."""

    bytes_sent: int = 0
    bytes_received: int = 0
    writes_done: int = 0
    requests_completed: int = 0
    peers_connected: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # "<where>:<reason>" → count
    write_latency: Histogram = field(default_factory=Histogram)
    request_latency: Histogram = field(default_factory=Histogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_write(self, nbytes: int, latency_s: float) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.writes_done += 1
            self.write_latency.observe(latency_s)

    def record_request(self, nbytes: int, latency_s: float) -> None:
        with self._lock:
            self.bytes_received += nbytes
            self.requests_completed += 1
            self.request_latency.observe(latency_s)

    def record_failure(self, where: str, reason: str) -> None:
        """`where`: "write", "request" or "handshake"; `reason`: a `FailureReason` value."""
        with self._lock:
            self.failures[f"{where}:{reason}"] += 1

    def record_peer(self) -> None:
        with self._lock:
            self.peers_connected += 1

    def snapshot(self) -> dict[str, Any]:
        """A copy safe to read from another thread (what an exporter scrapes)."""
        with self._lock:
            return {
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "writes_done": self.writes_done,
                "requests_completed": self.requests_completed,
                "peers_connected": self.peers_connected,
                "failures": dict(self.failures),
                "write_latency": {"bounds": self.write_latency.bounds,
                                  "counts": list(self.write_latency.counts),
                                  "sum": self.write_latency.total, "count": self.write_latency.n},
                "request_latency": {"bounds": self.request_latency.bounds,
                                    "counts": list(self.request_latency.counts),
                                    "sum": self.request_latency.total,
                                    "count": self.request_latency.n},
            }
