"""cli.commands: the model `tandem up` serves by default, and the error when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import main as cli
from cli.commands import default_model_dir, ensure_model


def test_up_serves_smollm2_unless_given_a_model(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path / "SmolLM2-135M-Instruct"
    assert ensure_model(str(tmp_path / "any")) == tmp_path / "any"


def test_a_missing_default_model_says_to_run_setup(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path))
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()  # half there: no files
    with pytest.raises(FileNotFoundError, match="run scripts/setup.sh"):
        ensure_model(None)
    assert cli.main(["up", "--exit", "--port", "0"]) == 2  # before any process starts
    err = capsys.readouterr().err
    assert err.startswith("tandem up: error: the default model is not in ")
    assert "tandem import-smollm2" in err and "--model DIR" in err
