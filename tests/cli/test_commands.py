"""cli.commands: the model `tandem up` serves by default, the error when it is missing, and how
it tells users to connect (TLS: with its CA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import main as cli
from cli.commands import connect_hint, default_model_dir, ensure_model


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


def test_up_tells_how_to_connect_with_its_ca_or_in_plaintext() -> None:
    tls = connect_hint("127.0.0.1:50051", "https://127.0.0.1:8000", "/logs/certs/ca.pem")
    assert 'tandem generate "Hello" --router 127.0.0.1:50051 --ca /logs/certs/ca.pem' in tls
    assert "curl --cacert /logs/certs/ca.pem https://127.0.0.1:8000/v1/models" in tls
    assert 'verify=ssl.create_default_context(cafile="/logs/certs/ca.pem")' in tls
    plain = connect_hint("127.0.0.1:50051", "http://127.0.0.1:8000", None)
    assert "--ca" not in plain and "curl http://127.0.0.1:8000/v1/models" in plain
