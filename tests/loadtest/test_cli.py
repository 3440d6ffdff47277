"""The command line: user errors in one line, `tandem bench` forwarding to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main as tandem
from loadtest.cli import main


def test_run_needs_a_tokenizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--rate", "1"]) == 2
    assert "error: tokenizer: give --tokenizer" in capsys.readouterr().err


def test_run_needs_a_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--vocab-size", "100"]) == 2
    assert "error: load: give --rate" in capsys.readouterr().err


def test_rate_and_concurrency_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--vocab-size", "100", "--rate", "1", "--concurrency", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_trace_needs_its_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--vocab-size", "100", "--workload", "trace"]) == 2
    assert "--trace FILE" in capsys.readouterr().err


def test_bad_length_spec_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit):
        main(["run", "--input-len", "normal:3"])


def test_tandem_bench_forwards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["bench", "make-trace", str(tmp_path / "t.jsonl"), "--requests", "5"]) == 0
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 5
    with pytest.raises(SystemExit) as done:
        tandem(["bench", "--help"])
    assert done.value.code == 0
    assert "tandem bench" in capsys.readouterr().out
