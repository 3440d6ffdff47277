"""compare: runs side by side in one table and one set of plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest

from loadtest.cli import main
from loadtest.compare import compare
from loadtest.report import write_json
from tests.loadtest.helpers import report


def test_two_runs_side_by_side(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", report("kv_aware"))
    write_json(tmp_path / "b.json", report("round_robin", rates=(1.0, 2.0, 4.0)))
    md, plots = compare([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")
    text = md.read_text()
    for row in ("| kv_aware: 1 req/s |", "| kv_aware: 2 req/s |", "| round_robin: 4 req/s |"):
        assert row in text
    assert text.count("req/s | 5 | 5 |") == 5
    assert [p.name for p in plots] == ["compare_latency_cdf.png", "compare_throughput.png",
                                       "compare_sweep.png"]
    for path in plots:
        assert matplotlib.image.imread(path).ndim == 3


def test_same_names_get_their_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", report("x"))
    write_json(tmp_path / "b.json", report("x"))
    text = compare([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "o")[0].read_text()
    assert "| x (a): 1 req/s |" in text and "| x (b): 1 req/s |" in text


def test_compare_needs_two(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", report("x"))
    with pytest.raises(ValueError, match="two or more"):
        compare([tmp_path / "a.json"], tmp_path)


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(tmp_path / "a.json", report("x"))
    write_json(tmp_path / "b.json", report("y"))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(tmp_path / "c")]) == 0
    assert "# Load test comparison" in capsys.readouterr().out
    assert (tmp_path / "c" / "compare.md").is_file()
