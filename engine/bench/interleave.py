"""Engines taking turns on one workload, with each run's CPU seconds and what the engines
that are not running use meanwhile.

Equal compute is a ground rule of the bench: an engine must have the machine to itself in its
turn. Each contender says where its CPU time is counted: this process (the in-process engines,
all threads: their OpenMP pools) or a subprocess tree (vLLM, its EngineCore child and their
threads). Every run is measured twice: the running engine's CPU seconds (with the wall time,
the cores it got), and the CPU seconds of every *other* source meanwhile, which should be ~0.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.bench.cpu_time import own_cpu_seconds, tree_cpu_seconds

PAUSE_S = 1.0  # before each run: see interleaved
IN_PROCESS = "this process"

Runner = Callable[[int], float]
"""Runs workload `i` once; returns its tokens per second."""


class ContenderGone(RuntimeError):
    """A contender cannot run any more (its process died): the bench goes on without it."""


@dataclass(frozen=True)
class Contender:
    run: Runner
    pid: int | None = None  # the root of a subprocess engine's tree; None: in this process

    @property
    def source(self) -> str:
        """Where its CPU seconds are counted."""
        return IN_PROCESS if self.pid is None else f"pid {self.pid}"

    def cpu_seconds(self) -> float:
        return own_cpu_seconds() if self.pid is None else tree_cpu_seconds(self.pid)


@dataclass
class Turns:
    """What `interleaved` measured on one workload (timed runs only, but `off_*` counts the
    warm-up runs too: a source's use while another runs is unfair in any run)."""

    rates: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    cpu: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wall: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    off_cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    off_wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    gone: dict[str, str] = field(default_factory=dict)  # name -> why it stopped taking turns

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(rates) for name, rates in self.rates.items()}

    def cpu_line(self) -> str:
        """Median CPU seconds per run of each engine, with the cores that makes."""
        parts = []
        for name, cpus in self.cpu.items():
            cpu, wall = statistics.median(cpus), statistics.median(self.wall[name])
            parts.append(f"{name} {cpu:,.1f} s ({cpu / wall:.2f} cores)")
        return "CPU per run " + ", ".join(parts)

    def off_line(self) -> str:
        """What each source used while another engine ran."""
        parts = [f"{source} {cpu:.2f} CPU s in {self.off_wall[source]:,.0f} s"
                 for source, cpu in self.off_cpu.items()]
        return "used while not their turn: " + ", ".join(parts)


def interleaved(contenders: dict[str, Contender], i: int, repeats: int) -> Turns:
    """Each contender runs workload `i` once to warm up, then `repeats` times, taking turns.

    A pause before each run lets the previous engine's OpenMP threads stop spinning (measured:
    Tandem's prefill right after a vLLM run was 4–20% slower than one second later), and the
    order rotates so that no engine always follows the same one. A contender that raises
    `ContenderGone` takes no more turns (`Turns.gone`); the others go on.
    """
    names = list(contenders)
    sources = {c.source: c for c in contenders.values()}
    turns = Turns()
    for attempt in range(repeats + 1):  # attempt 0 warms up
        for name in names[attempt % len(names):] + names[:attempt % len(names)]:
            if name in turns.gone:
                continue
            time.sleep(PAUSE_S)
            mine = contenders[name]
            before = {s: c.cpu_seconds() for s, c in sources.items()}
            start = time.perf_counter()
            try:
                rate = mine.run(i)
            except ContenderGone as gone:
                turns.gone[name] = str(gone)
                turns.rates.pop(name, None)
                continue
            wall = time.perf_counter() - start
            used = {s: c.cpu_seconds() - before[s] for s, c in sources.items()}
            for source in sources.keys() - {mine.source}:
                turns.off_cpu[source] += used[source]
                turns.off_wall[source] += wall
            if attempt:
                turns.rates[name].append(rate)
                turns.cpu[name].append(used[mine.source])
                turns.wall[name].append(wall)
    return turns
