"""PNG plots of one run or of several side by side (matplotlib, Agg backend, no display).

- `latency_cdf.png`: TTFT, ITL and end-to-end latency CDFs, one line per point;
- `throughput.png`: output tokens/s over time, one line per point;
- `sweep.png`: goodput and p99 TTFT against the offered rate (or the concurrency), one line
  per run, when a run has two or more points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display; before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np

from loadtest.report import point_records
from loadtest.summary import tokens_over_time

Runs = Mapping[str, Sequence[dict[str, Any]]]  # run name → its points (as in the run JSON)


def _series(runs: Runs) -> list[tuple[str, dict[str, Any]]]:
    """(line label, point): the point's label alone when there is one run."""
    return [(point["label"] if len(runs) == 1 else f"{name}: {point['label']}", point)
            for name, points in runs.items() for point in points]


def latency_cdf(runs: Runs, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, point in _series(runs):
        records = [r for r in point_records(point) if r.outcome == "ok"]
        metrics = {"TTFT": [r.ttft for r in records if r.ttft is not None],
                   "ITL": [g for r in records for g in r.itl],
                   "end-to-end": [e for r in records if (e := r.e2e) is not None]}
        for ax, values in zip(axes, metrics.values(), strict=True):
            if values:
                xs = np.sort(np.asarray(values)) * 1000
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    for ax, name in zip(axes, ("TTFT", "ITL", "end-to-end"), strict=True):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.01)
    _legend(axes[0])
    return _save(fig, path)


def throughput(runs: Runs, path: Path, bin_s: float = 1.0) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, point in _series(runs):
        starts, rates = tokens_over_time(point_records(point), bin_s)
        if len(starts):
            ax.stairs(rates, np.append(starts, starts[-1] + bin_s), label=label)
    ax.set_title(f"output throughput ({bin_s:g} s bins)")
    ax.set_xlabel("s from the point's start")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _x(point: dict[str, Any]) -> float | None:
    """Where a point sits in its sweep: its rate, its concurrency or its trace speed-up."""
    load = point["load"]
    if load["arrival"] == "trace":
        return float(load["speedup"])
    return load["rate"] if load["rate"] is not None else load["concurrency"]


def sweep(runs: Runs, path: Path) -> Path | None:
    """Goodput and p99 TTFT against the load; None when no run has two points to join."""
    if not any(len([p for p in points if _x(p) is not None]) >= 2 for points in runs.values()):
        return None
    fig, (good, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = set()
    for name, points in runs.items():
        swept = sorted((p for p in points if _x(p) is not None), key=lambda p: _x(p) or 0.0)
        xs = [_x(p) for p in swept]
        kinds |= {_kind(p["load"]) for p in swept}
        good.plot(xs, [p["summary"]["goodput"]["requests_per_s"] for p in swept], "o-",
                  label=name)
        p99 = [p["summary"]["latency_s"]["ttft"]["p99"] for p in swept]
        ttft.plot(xs, [np.nan if v is None else v * 1000 for v in p99], "o-", label=name)
    xlabel = " / ".join(sorted(kinds))
    for ax, title, ylabel in ((good, "goodput", "requests/s within the SLOs"),
                              (ttft, "p99 TTFT", "ms")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path)


def _kind(load: dict[str, Any]) -> str:
    if load["arrival"] == "trace":
        return "trace speed-up"
    return "offered rate (req/s)" if load["rate"] is not None else "concurrency"


def write_plots(runs: Runs, out_dir: Path, prefix: str = "") -> list[Path]:
    """Every plot that has data, as PNGs in `out_dir`; returns their paths."""
    paths = [latency_cdf(runs, out_dir / f"{prefix}latency_cdf.png"),
             throughput(runs, out_dir / f"{prefix}throughput.png")]
    swept = sweep(runs, out_dir / f"{prefix}sweep.png")
    return paths + ([swept] if swept is not None else [])


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # a point without data draws no line
        ax.legend(fontsize="small")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
