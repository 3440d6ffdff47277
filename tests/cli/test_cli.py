"""cli.main: the `tandem` console script and its make-tiny-model subcommand."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from cli import main as cli
from engine.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_make_tiny_model_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = _tandem("make-tiny-model", str(out), "--arch", "qwen2", "--seed", "3",
                     "--preset", "tiny", "--shards", "2")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    expected = make_tiny_model(tmp_path / "lib", arch="qwen2", seed=3, shards=2)
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert "model.safetensors.index.json" in names
    for name in names:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name


def test_user_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _tandem("make-tiny-model", str(tmp_path / "m"), "--shards", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("tandem make-tiny-model: error: shards")
    assert "Traceback" not in result.stderr


def test_argparse_rejects_bad_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["make-tiny-model", str(tmp_path), "--arch", "gpt2"])
    assert exc.value.code == 2
    assert "--arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])  # a subcommand is required
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["make-tiny-model", str(tmp_path / "m"), "--preset", "bench"]) == 0
    assert "bench llama" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_console_script_points_at_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tandem"]
    assert script.value == "cli.main:main"
    assert script.load() is cli.main
    assert "make-tiny-model" in cli.SUBCOMMANDS


@pytest.mark.parametrize(("role", "flag"), [("router", "--redis-url"),
                                            ("prefill", "--transfer-token"),
                                            ("decode", "--lease-ms")])
def test_a_role_subcommand_hands_every_flag_to_the_role(role: str, flag: str) -> None:
    done = _tandem(role, "--help")
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout and f"usage: tandem {role}" in done.stdout
    bad = _tandem(role, "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def test_a_server_given_neither_tls_files_nor_plaintext_refuses_to_start() -> None:
    done = _tandem("router", "--model", "/m", "--redis-url", "redis://127.0.0.1:1/0")
    assert done.returncode == 2, done.stderr
    assert "tls_cert: TLS is required: give --tls-cert, --tls-key and --tls-ca" in done.stderr
    assert "--insecure-plaintext" in done.stderr
