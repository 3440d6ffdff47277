"""Merging the runs of processes that sent together (`loadtest.merge`), the start barrier
(`--start-at`) and how `parallel_load.py` splits a load."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.arrivals import Load
from loadtest.merge import merge_point, merge_runs
from loadtest.records import RequestRecord
from loadtest.report import build_report
from loadtest.runner import PointResult
from loadtest.session import _start_at
from loadtest.summary import Slo

SLO = Slo(ttft_s=0.05, tpot_s=None)


def part(started: float, ttfts: list[float], duration: float, name: str) -> dict[str, Any]:
    """A one-point run of one process: a request sent every 0.1 s, one token each."""
    records = [RequestRecord(f"{name}-{i}", i, "", i * 0.1, i * 0.1, 8, 1,
                             chunk_times=[i * 0.1 + t], chunk_tokens=[1],
                             end_s=i * 0.1 + t) for i, t in enumerate(ttfts)]
    point = PointResult(Load(concurrency=1), records, duration, {"retries": float(len(name))})
    config = {"workload": "synthetic", "seed": 0, "duration": duration, "max_requests": 9,
              "started_unix": started}
    return build_report(name, "tandem-grpc", config, [point], SLO)


def test_merge_moves_times_to_the_first_clock_and_sums_the_throughput() -> None:
    a = part(100.0, [0.01, 0.02, 0.03], 1.0, "a")
    b = part(100.25, [0.04, 0.06], 1.0, "b")
    point, skew = merge_point([b, a], Load(concurrency=2))
    assert skew == pytest.approx(0.25)
    assert point.duration_s == pytest.approx(1.25)  # a's start to b's end
    assert sorted(r.request_id for r in point.records) == ["a-0", "a-1", "a-2", "b-0", "b-1"]
    b0 = next(r for r in point.records if r.request_id == "b-0")
    assert (b0.send_s, b0.chunk_times, b0.end_s) == (0.25, [0.29], 0.29)
    assert b0.ttft == pytest.approx(0.04)  # latencies do not move
    assert point.cluster == b["points"][0]["cluster"]  # the first report given
    report = merge_runs("merged", "tandem-grpc", [(point, skew, 2)], SLO, {"seed": 0})
    doc = report["points"][0]
    assert doc["label"] == "concurrency 2 (2 processes)"
    assert (doc["processes"], doc["start_skew_s"]) == (2, pytest.approx(0.25))
    summary = doc["summary"]
    assert summary["requests"]["ok"] == 5
    assert summary["throughput"]["requests_per_s"] == pytest.approx(5 / 1.25)
    assert summary["goodput"]["requests_per_s"] == pytest.approx(4 / 1.25)  # 0.06 > 50 ms
    assert summary["latency_s"]["ttft"]["p50"] == pytest.approx(0.03)


def test_merge_refuses_what_it_cannot_line_up() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_point([], Load(concurrency=1))
    old = part(1.0, [0.01], 1.0, "old")
    del old["config"]["started_unix"]
    with pytest.raises(ValueError, match="started_unix"):
        merge_point([old], Load(concurrency=1))
    two = part(1.0, [0.01], 1.0, "two")
    two["points"].append(two["points"][0])
    with pytest.raises(ValueError, match="exactly one"):
        merge_point([two], Load(concurrency=1))


def test_start_at_waits_for_the_wall_clock_and_a_late_process_starts_at_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    when = time.time() + 0.2
    started = asyncio.run(_start_at(repr(when)))
    assert when <= started < when + 0.1
    started = asyncio.run(_start_at(repr(time.time() - 1.0)))
    assert "starting now" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--start-at"):
        asyncio.run(_start_at("soon"))
    assert asyncio.run(_start_at(None)) == pytest.approx(time.time(), abs=0.1)


def test_start_at_stdin_says_ready_then_reads_the_time(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    when = time.time() + 0.1
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{when!r}\n"))
    started = asyncio.run(_start_at("stdin"))
    assert capsys.readouterr().out == "ready\n"
    assert when <= started < when + 0.1


def test_parallel_load_starts_processes_together(tmp_path: Path) -> None:
    """Two real processes: each says ready at its own pace, both get one start time."""
    child = ("import sys, time; time.sleep(float(sys.argv[1])); print('ready', flush=True); "
             "t = float(sys.stdin.readline()); print('late' if time.time() > t + 0.2 else 'ok')")
    procs = [subprocess.Popen([sys.executable, "-c", child, delay], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for delay in ("0", "0.5")]
    began = time.monotonic()
    _script("parallel_load").start_together(procs, 0.3, 30.0)
    assert time.monotonic() - began >= 0.5  # waited for the slow one
    assert [p.wait() for p in procs] == [0, 0]


def _script(name: str) -> Any:
    path = Path(__file__).parents[2] / "loadtest" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parallel_load_splits_concurrency_evenly_and_divides_the_rate() -> None:
    shares = _script("parallel_load").shares
    assert shares(Load(concurrency=10), 4) == [["--concurrency", "3"], ["--concurrency", "3"],
                                               ["--concurrency", "2"], ["--concurrency", "2"]]
    assert shares(Load(concurrency=1), 4) == [["--concurrency", "1"]]  # one process
    assert shares(Load(rate=6.0), 3) == [["--rate", "2.0"]] * 3


def test_cluster_bench_hands_the_load_values_to_parallel_load() -> None:
    bench = _script("cluster_bench")
    own, rest = bench.split_flags(["--input-len", "64", "--concurrency", "1", "32", "--seed",
                                   "3", "--no-progress"], ("--concurrency", "--rate", "--seed"))
    assert own == ["--concurrency", "1", "32", "--seed", "3"]
    assert rest == ["--input-len", "64", "--no-progress"]
    command = bench.load_command(4, "x", Path("/o"), ["--address", "a:1"],
                                 ["--concurrency", "8", "--duration", "2"])
    assert command[1].endswith("parallel_load.py")
    assert command[2:] == ["--processes", "4", "--name", "x", "--out", "/o", "--concurrency",
                           "8", "--", "--address", "a:1", "--duration", "2"]
    single = bench.load_command(1, "x", Path("/o"), ["--address", "a:1"], ["--concurrency", "8"])
    assert single[1:4] == ["-m", "loadtest", "run"] and single[-2:] == ["--concurrency", "8"]


def test_cluster_bench_pins_every_thread_of_a_worker() -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    child = subprocess.Popen([sys.executable, "-c", "import threading, time; "
                              "threading.Thread(target=time.sleep, args=(30,)).start(); "
                              "print('up', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"  # 2 threads
        _script("cluster_bench").pin(child.pid, cpu)
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) == 2
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tids)
    finally:
        child.kill()
        child.wait()
