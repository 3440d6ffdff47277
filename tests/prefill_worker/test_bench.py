"""`python -m prefill_worker.bench` runs end to end on the tiny model: a real cluster, a real
transfer pair, one row per prompt length whose ratio is TTFT / engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prefill_worker.bench import main

pytestmark = pytest.mark.timeout(300)


def test_bench_prints_a_row_per_length(tiny_llama: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    main(["--model", str(tiny_llama), "--lengths", "8", "40", "--repeats", "1",
          "--num-blocks", "64"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| \d", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["8", "40"], out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        engine, ttft, ratio, transfer, goal = (float(c.replace(",", "")) for c in cells[1:6])
        assert engine > 0 and ttft > 0 and transfer > 0
        assert ratio == pytest.approx(ttft / engine, rel=0.05, abs=0.01)
        assert goal == pytest.approx(engine + transfer + 5, abs=0.2)
        assert cells[6] == ("yes" if ttft <= goal else "no")
        assert 0 < float(cells[7].replace(",", "")) < ttft  # the worker's step, inside the TTFT
