"""Length distributions from a command-line spec: `fixed:128`, `uniform:64,256`,
`lognormal:128,0.5` (mean, sigma of the underlying normal), drawn with numpy from a seeded
generator and clipped to [1, max]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts.

    fixed: always `a`; uniform: integers in [a, b], both included; lognormal: mean `a`, sigma `b`
    (the log-normal's mu is chosen so that its mean, before rounding and clipping, is `a`).
    """

    kind: str
    a: float
    b: float = 0.0
    max_len: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.a < 1:
            raise ValueError(f"length: {self.kind} needs a first value >= 1, got {self.a}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"length: uniform needs low <= high, got {self.a},{self.b}")
        if self.kind == "lognormal" and self.b < 0:
            raise ValueError(f"length: lognormal sigma must be >= 0, got {self.b}")

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """`fixed:N`, `uniform:LOW,HIGH`, `lognormal:MEAN,SIGMA`; a bare `N` is fixed."""
        kind, _, rest = spec.partition(":")
        if not rest:
            kind, rest = "fixed", kind
        try:
            values = [float(v) for v in rest.split(",")]
        except ValueError:
            raise ValueError(f"length: cannot parse {spec!r} (e.g. fixed:128, uniform:64,256, "
                             "lognormal:128,0.5)") from None
        want = 1 if kind == "fixed" else 2
        if len(values) != want:
            raise ValueError(f"length: {kind} takes {want} value(s), got {spec!r}")
        return cls(kind, values[0], values[1] if len(values) > 1 else 0.0)

    @property
    def mean(self) -> float:
        """The distribution's mean, before rounding and clipping."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths, int64, each in [1, max_len]."""
        if self.kind == "fixed":
            values = np.full(n, round(self.a), dtype=np.int64)
        elif self.kind == "uniform":
            values = rng.integers(round(self.a), round(self.b), size=n, endpoint=True)
        else:
            mu = math.log(self.a) - self.b * self.b / 2  # E[exp(N(mu, s²))] = exp(mu + s²/2)
            values = np.rint(rng.lognormal(mu, self.b, size=n)).astype(np.int64)
        return np.clip(values, 1, self.max_len)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"
