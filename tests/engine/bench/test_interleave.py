"""`interleaved`: rates and CPU seconds per engine, and what a subprocess engine uses while the
others run: the busy tree counts there when it is left running, nothing when it is stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.bench import interleave
from engine.bench.interleave import IN_PROCESS, Contender, ContenderGone, interleaved
from engine.bench.paused_group import PausedGroup

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def busy() -> Iterator[PausedGroup]:
    group = PausedGroup([sys.executable, "-m", "tests.support.busy_tree"],
                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert group.proc.stdout is not None
    group.proc.stdout.readline()  # its child has started
    try:
        yield group
    finally:
        group.kill()


def compute(seconds: float) -> float:
    """Spins for `seconds`; "tokens per second" 1/seconds."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return 1 / seconds


def contenders(group: PausedGroup, stop_between: bool) -> dict[str, Contender]:
    def sub(i: int) -> float:
        if not stop_between:
            return compute(0.05)
        with group.turn():
            time.sleep(0.05)  # the tree computes meanwhile
        return 20.0
    if stop_between:
        group.stop()
    return {"a": Contender(lambda i: compute(0.1)), "b": Contender(lambda i: compute(0.2)),
            "sub": Contender(sub, group.proc.pid)}


@pytest.mark.parametrize("stop_between", [True, False])
def test_off_turn_cpu_of_a_subprocess(busy: PausedGroup, stop_between: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interleave, "PAUSE_S", 0.0)
    turns = interleaved(contenders(busy, stop_between), 0, repeats=2)
    rates = turns.medians()
    assert sorted(rates) == ["a", "b", "sub"]
    assert rates["a"] == pytest.approx(10.0) and rates["b"] == pytest.approx(5.0)
    assert all(len(turns.cpu[n]) == len(turns.wall[n]) == 2 for n in rates)
    assert min(turns.wall["b"]) >= 0.2
    assert set(turns.off_cpu) == {IN_PROCESS, f"pid {busy.proc.pid}"}
    # a and b ran 3 times each (warm-up included): 0.9 s of their turns
    assert turns.off_wall[f"pid {busy.proc.pid}"] >= 0.9
    if stop_between:
        assert turns.off_cpu[f"pid {busy.proc.pid}"] == 0.0
    else:
        assert turns.off_cpu[f"pid {busy.proc.pid}"] > 0.05
    assert "a " in turns.cpu_line() and "cores" in turns.cpu_line()
    assert f"pid {busy.proc.pid}" in turns.off_line()


def test_a_contender_that_is_gone_takes_no_more_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's worker OOM-killed mid-bench: the others go on, its reason is kept."""
    monkeypatch.setattr(interleave, "PAUSE_S", 0.0)
    calls: list[str] = []

    def dies_on_second_call(i: int) -> float:
        calls.append("gone")
        if calls.count("gone") == 2:
            raise ContenderGone("vLLM exited (1)")
        return 3.0

    def ours(i: int) -> float:
        calls.append("ours")
        return 2.0

    turns = interleaved({"ours": Contender(ours), "gone": Contender(dies_on_second_call)},
                        0, repeats=3)
    assert calls.count("gone") == 2 and calls.count("ours") == 4
    assert turns.medians() == {"ours": 2.0}
    assert turns.gone == {"gone": "vLLM exited (1)"}
