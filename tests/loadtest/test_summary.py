"""Percentiles, throughput, goodput and error rate on hand-made records, to the digit."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.records import CANCELLED, ERROR, RequestRecord
from loadtest.summary import Slo, distribution, summarize, tokens_over_time


def record(i: int, send: float, chunks: list[float], tokens: list[int] | None = None,
           outcome: str = "ok", code: str | None = None, **kw: object) -> RequestRecord:
    return RequestRecord(f"r{i}", i, "", send, send, 10, 4, chunk_times=chunks,
                         chunk_tokens=tokens or [1] * len(chunks),
                         end_s=chunks[-1] if chunks else send + 1, outcome=outcome,
                         error_code=code, **kw)  # type: ignore[arg-type]


RECORDS = [
    record(0, 0.0, [0.1, 0.2, 0.3, 0.4]),  # TTFT 0.1, TPOT 0.1, e2e 0.4
    record(1, 1.0, [1.5, 1.7, 1.9]),  # TTFT 0.5, TPOT 0.2, e2e 0.9
    record(2, 2.0, [2.2, 2.6], tokens=[1, 3]),  # TTFT 0.2, 4 tokens: TPOT 0.4/3, e2e 0.6
    record(3, 3.0, [3.05]),  # one token: no TPOT, TTFT 0.05
    record(4, 4.0, [4.5], outcome=ERROR, code="UNAVAILABLE"),
    record(5, 5.0, [], outcome=CANCELLED),
]


def test_distribution_uses_numpy_linear_percentiles() -> None:
    d = distribution([1.0, 2.0, 3.0, 4.0, 10.0])
    assert d == {"p50": 3.0, "p90": pytest.approx(7.6), "p99": pytest.approx(9.76),
                 "mean": 4.0, "count": 5}
    assert distribution([])["p50"] is None


def test_record_figures() -> None:
    r = RECORDS[2]
    assert r.ttft == pytest.approx(0.2)
    assert r.itl == [pytest.approx(0.4)]
    assert r.output_tokens == 4
    assert r.tpot == pytest.approx(0.4 / 3)
    assert RECORDS[3].tpot is None
    assert RECORDS[4].e2e is None and RECORDS[4].tpot is None
    with_usage = record(9, 0.0, [0.1, 0.2], completion_tokens=5)
    assert with_usage.output_tokens == 5 and with_usage.tpot == pytest.approx(0.1 / 4)


def test_summary_on_hand_made_records() -> None:
    s = summarize(RECORDS, duration_s=8.0, slo=Slo(ttft_s=0.3, tpot_s=0.15))
    assert s["requests"] == {"sent": 6, "ok": 4, "errors": 1, "cancelled": 1,
                             "error_rate": 0.2}
    assert s["errors_by_code"] == {"UNAVAILABLE": 1}
    # ok outputs: 4 + 3 + 4 + 1 = 12 tokens; inputs 4 × 10
    assert s["throughput"] == {"requests_per_s": 0.5, "output_tokens_per_s": 1.5,
                               "input_tokens_per_s": 5.0}
    # TTFT <= 0.3 and TPOT <= 0.15: r0 (0.1, 0.1), r2 (0.2, 0.133), r3 (0.05, none) → 3
    assert s["goodput"]["requests_per_s"] == 3 / 8
    assert s["goodput"]["fraction_ok"] == 0.75
    lat = s["latency_s"]
    assert lat["ttft"]["mean"] == pytest.approx((0.1 + 0.5 + 0.2 + 0.05) / 4)
    assert lat["ttft"]["p50"] == pytest.approx(0.15)
    assert lat["ttft"]["p99"] == pytest.approx(np.percentile([0.1, 0.5, 0.2, 0.05], 99))
    # ITL pools every gap: 0.1 ×3, 0.2 ×2, 0.4
    assert lat["itl"]["count"] == 6
    assert lat["itl"]["mean"] == pytest.approx(1.1 / 6)
    assert lat["itl"]["p50"] == pytest.approx(0.15)
    assert lat["tpot"]["count"] == 3
    assert lat["e2e"]["p50"] == pytest.approx(0.5)
    assert lat["e2e"]["mean"] == pytest.approx((0.4 + 0.9 + 0.6 + 0.05) / 4)


def test_goodput_without_slos_is_the_ok_rate() -> None:
    s = summarize(RECORDS, duration_s=2.0, slo=Slo())
    assert s["goodput"]["requests_per_s"] == s["throughput"]["requests_per_s"] == 2.0


def test_ttft_slo_alone() -> None:
    s = summarize(RECORDS, duration_s=1.0, slo=Slo(ttft_s=0.15))
    assert s["goodput"]["requests_per_s"] == 2.0  # r0 and r3


def test_cached_ratio_from_usage() -> None:
    records = [record(0, 0, [0.1], prompt_tokens=100, cached_tokens=64),
               record(1, 0, [0.1], prompt_tokens=100, cached_tokens=0)]
    assert summarize(records, 1.0, Slo())["tokens"]["cached_prompt_ratio"] == 0.32
    assert summarize(RECORDS, 1.0, Slo())["tokens"]["cached_prompt_ratio"] is None


def test_tokens_over_time() -> None:
    starts, rates = tokens_over_time(RECORDS[:3], bin_s=0.5)
    assert list(starts) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    # 0.1 0.2 0.3 0.4 | - | - | 1.5 1.7 1.9 | 2.2 | 2.6 (3 tokens)
    assert list(rates) == [8.0, 0.0, 0.0, 6.0, 2.0, 6.0]
    assert len(tokens_over_time([], 1.0)[0]) == 0
