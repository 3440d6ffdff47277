"""The run JSON round-trips, the Markdown says what ran, and the plots are PNGs that open."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from loadtest.plots import write_plots
from loadtest.report import markdown, point_records, read_json, write_json
from tests.loadtest.helpers import report


def test_json_round_trips(tmp_path: Path) -> None:
    run = report("a")
    write_json(tmp_path / "run.json", run)
    again = read_json(tmp_path / "run.json")
    assert again == json.loads(json.dumps(run))
    records = point_records(again["points"][0])
    assert [r.ttft for r in records] == pytest.approx([0.01] * 5)
    assert again["points"][1]["summary"]["goodput"]["requests_per_s"] == 0.0  # TTFT 20 ms
    assert again["points"][0]["summary"]["goodput"]["requests_per_s"] == pytest.approx(5 / 3)


def test_not_a_run_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="not a loadtest run file"):
        read_json(tmp_path / "x.json")


def test_markdown_has_the_tables() -> None:
    text = markdown(report("a"), ["out/latency_cdf.png"])
    assert text.startswith("# Load test: a\n")
    assert "| 1 req/s | 5 | 5 | 0 | 0 | 1.67 | 5.0 | 1.67 | 10.0 |" in text
    assert "| 2 req/s | 5 | 5 | 0 | 0 | 1.67 | 5.0 | 0.00 | 20.0 |" in text
    assert "TTFT 15.0 ms, TPOT 50.0 ms" in text
    assert "| 1 req/s | 0.500 | 0.500 | 0.250 | 12 | 5 | 0 | 0 | 0 | 0 |" in text
    assert "![latency_cdf](latency_cdf.png)" in text


def test_plots_are_pngs_that_open(tmp_path: Path) -> None:
    paths = write_plots({"a": report("a")["points"]}, tmp_path)
    assert [p.name for p in paths] == ["latency_cdf.png", "throughput.png", "sweep.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_one_point_has_no_sweep_plot(tmp_path: Path) -> None:
    paths = write_plots({"a": report("a", rates=(1.0,))["points"]}, tmp_path)
    assert [p.name for p in paths] == ["latency_cdf.png", "throughput.png"]
