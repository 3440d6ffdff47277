"""The longest-prefix walk both index readers share: block by block, which workers still hold
every block so far.

Block hashes are chained, so a worker holding block i of a prompt holds its whole prefix; the
walk stops at the first block no (followed) worker holds. It is fed one block's holders at a
time, so a reader can fetch them however it likes (from memory, or from Redis in pipelined
chunks) and stop fetching as soon as `step` says no worker is left.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


class PrefixWalk:
    """Leading blocks held per worker: `step(holders)` per block in order, then `result()`."""

    def __init__(self, workers: Collection[str] | None = None) -> None:
        self._alive: set[str] | None = None if workers is None else set(workers)
        self._matched: dict[str, int] = {}
        self._position = 0

    @property
    def over(self) -> bool:
        """No worker can match further blocks."""
        return self._alive is not None and not self._alive

    def step(self, holders: Iterable[str]) -> bool:
        """The next block's holders; returns whether any worker still holds every block."""
        still = set(holders)
        if self._alive is not None:
            still &= self._alive
            if self._position:
                for gone in self._alive - still:  # it held blocks [0, position)
                    self._matched[gone] = self._position
        self._alive = still
        self._position += 1
        return bool(still)

    def result(self) -> dict[str, int]:
        """Per worker, the number of leading blocks it holds (only workers with at least one)."""
        return {**self._matched, **dict.fromkeys(self._alive or (), self._position)}
