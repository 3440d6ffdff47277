"""When requests are sent: open loop (Poisson or gamma arrivals at a rate, or a trace's own
times divided by a speed-up), or closed loop (a fixed number of requests in flight, each sent
when one ends).

A `Load` is one point of a run; a sweep is a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma", "trace")


@dataclass(frozen=True)
class Load:
    """How one run point sends its requests.

    open loop: `rate` requests/s, gaps drawn from `arrival` ("poisson": exponential; "gamma":
    gamma of shape `burstiness`, the same mean: below 1 burstier than Poisson, above 1
    smoother), or "trace": each request at its own `arrival_s` divided by `speedup`; closed
    loop: `concurrency` requests in flight.
    """

    rate: float | None = None
    concurrency: int | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    speedup: float = 1.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None) and self.arrival != "trace":
            raise ValueError("load: give exactly one of rate (open loop) and concurrency "
                             "(closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival: must be one of {', '.join(ARRIVALS)}, got "
                             f"{self.arrival!r}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness: must be > 0, got {self.burstiness}")
        if self.speedup <= 0:
            raise ValueError(f"speedup: must be > 0, got {self.speedup}")

    @property
    def closed(self) -> bool:
        return self.concurrency is not None

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        if self.arrival == "trace":
            return f"trace x{self.speedup:g}"
        return f"{self.rate:g} req/s"


def arrival_times(load: Load, n: int, seed: int) -> np.ndarray:
    """Send offsets in seconds from the run's start of `n` open-loop requests (sorted)."""
    if load.rate is None:
        raise ValueError("arrival_times: a closed-loop load has no arrival times")
    rng = np.random.default_rng(seed)
    if load.arrival == "gamma":
        k = load.burstiness
        gaps = rng.gamma(k, 1 / (load.rate * k), size=n)  # mean k·θ = 1 / rate
    else:
        gaps = rng.exponential(1 / load.rate, size=n)
    return np.cumsum(gaps) - gaps[0] if n else gaps  # the first request goes at once
