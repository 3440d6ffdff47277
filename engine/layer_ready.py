"""When a layer group's K/V is really in the cache, and running actions in order once it is.

The model calls its per-layer hook right after *launching* a layer's kernels. On the CPU that is
after they ran (torch executes eagerly), but on CUDA the kernels may still be queued, and a
one-sided write (NIXL, UCX) posted then would read the cache before the layer has written it.
So the hook records a marker after each layer group (`record_ready`), and whoever acts on that
group's K/V waits for it:

- `CpuReady`: already done (the compute ran before the hook);
- `CudaReady`: a `torch.cuda.Event` recorded on the device's current stream after the group's
  kernels; done when the event is (`query`), `wait` blocks on it (`synchronize`).

`ReadyQueue` runs actions in the order they were pushed, each only once its marker is done:
`run_ready` runs what it can without blocking (between layers, so the GPU keeps computing the
next group while the host posts a finished one), `run_all` waits for everything (at the end of
a step).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch


class GroupReady(Protocol):
    """A marker recorded after a layer group's kernels were launched."""

    def done(self) -> bool:
        """Whether everything launched before the marker has finished (never blocks)."""
        ...

    def wait(self) -> None:
        """Blocks until `done()`."""
        ...


class CpuReady:
    """The CPU computes eagerly: whatever was launched has run."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class CudaReady:
    """An event recorded on `device`'s current stream."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()


def record_ready(device: torch.device) -> GroupReady:
    """A marker after everything launched so far on `device`."""
    if device.type == "cuda":
        return CudaReady(device)
    if device.type == "cpu":
        return CpuReady()
    raise ValueError(f"device: no readiness marker for {device}")


class ReadyQueue:
    """Actions run in push order, each once its marker is done (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: deque[tuple[GroupReady, Callable[[], None]]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, ready: GroupReady, action: Callable[[], None]) -> None:
        self._pending.append((ready, action))

    def run_ready(self) -> int:
        """Runs the actions at the head whose markers are done; stops at the first that is not.
        Returns how many ran."""
        ran = 0
        while self._pending and self._pending[0][0].done():
            self._pending.popleft()[1]()
            ran += 1
        return ran

    def run_all(self) -> int:
        """Waits for each marker in order and runs its action. Returns how many ran."""
        ran = 0
        while self._pending:
            ready, action = self._pending.popleft()
            ready.wait()
            action()
            ran += 1
        return ran
