"""engine.default_model: where the converted default model lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.default_model import models_home, smollm2_dir


def test_models_home_follows_the_environment(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_MODELS_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models_home() == tmp_path / "home" / ".cache" / "tandem" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models_home() == tmp_path / "xdg" / "tandem" / "models"
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path / "models"))
    assert models_home() == tmp_path / "models"
    assert smollm2_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
