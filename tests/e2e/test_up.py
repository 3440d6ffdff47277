"""`tandem up --demo --exit`: the README's main command, as a user runs it (a subprocess), on a
generated tiny model (fast) and on the default model, SmolLM2, as converted at set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo import QUESTIONS

pytestmark = pytest.mark.timeout(300)


def finished(stdout: str) -> int:
    """How many demo requests streamed to their end (a finish line each)."""
    return sum(1 for line in stdout.splitlines()
               if line.startswith("[") and line.endswith(" generated]"))


def test_tandem_up_demo_serves_and_leaves_nothing_behind(tiny_llama: Path,
                                                         tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--demo", "--exit", "--port", "0",
         "--http-port", "0", "--prefill", "1", "--decode", "1", "--model", str(tiny_llama),
         "--log-dir", str(logs)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "router listening on 127.0.0.1:" in done.stdout
    # TLS by default, from a throwaway CA in the log folder, and how to connect is printed
    ca = logs / "certs" / "ca.pem"
    assert f"(TLS; CA {ca})" in done.stdout and ca.is_file()
    assert "OpenAI API on https://127.0.0.1:" in done.stdout
    assert finished(done.stdout) == 3  # three sample requests streamed to the end
    assert "prefix index exact" in done.stdout
    pids = [line.split()[0] for line in subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        if str(logs) in line or f"--model {tiny_llama}" in line]
    assert not pids, f"processes left behind: {pids}"


@pytest.mark.slow
def test_tandem_up_demo_serves_smollm2_by_default(smollm2: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--demo", "--exit", "--port", "0",
         "--http-port", "0", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    for question in QUESTIONS:
        assert f"> {question}\n" in done.stdout
    assert finished(done.stdout) == 3
    assert "[stop:" in done.stdout  # an answer ended at <|im_end|>, not at max_tokens
    assert "Paris" in done.stdout  # "What is the capital of France?", answered


def test_tandem_up_without_redis_says_how_to_install(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--exit", "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert done.returncode == 2
    assert "redis-server not found" in done.stderr and "apt-get install redis-server" in \
        done.stderr
